"""The gRPC face of the proxy: tensorflow.serving.PredictionService and ModelService.

Handlers are generic and take raw bytes (no Python protobuf objects on the hot path):
Predict goes to the predict service (core decoder, then the engine's batch queues);
everything else is forwarded to a replica untouched, and its status code and message come
back unchanged; but HandleReloadConfigRequest, which the proxy answers itself: its
ModelServerConfig becomes the proxy's model config (names and version_labels, resolved for
the whole fleet). Forwarded, it would reconfigure one replica and leave the rest as they
were."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from batchproxy.auth import UNAUTHENTICATED_MESSAGE, TokenAuth
from batchproxy.errors import INTERNAL_ERROR_MESSAGE, ProxyError
from batchproxy.frontends.predict_service import CallRecord, PredictService
from batchproxy.methods import (
    CLASSIFY,
    GET_MODEL_METADATA,
    GET_MODEL_STATUS,
    HANDLE_RELOAD_CONFIG,
    MULTI_INFERENCE,
    PREDICT,
    PREDICTION_SERVICE,
    REGRESS,
)
from batchproxy.model_config import ConfigError
from batchproxy.priority import priority_of_metadata
from batchproxy.protos import (
    get_model_status_pb2,
    model_server_config_pb2,
    model_spec_holder_pb2,
    services_pb2,
)

log = logging.getLogger(__name__)

# Forwarded to a replica unchanged. MultiInference's tasks may name several models, so it
# is not routed by model.
FORWARDED = (CLASSIFY, REGRESS, MULTI_INFERENCE, GET_MODEL_METADATA, GET_MODEL_STATUS)
UNROUTED = frozenset({MULTI_INFERENCE})
# What the proxy does with a ReloadConfigRequest's ModelServerConfig (model_config.py).
Reload = Callable[[model_server_config_pb2.ModelServerConfig | None], None]

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class PredictionHandlers:
    """gRPC transport only: authentication, deadlines and status codes. What a call means
    is the predict service's business."""

    def __init__(self, service: PredictService, *, auth: TokenAuth | None = None,
                 reload: Reload | None = None) -> None:
        self.service = service
        self.auth = auth
        self.reload = reload

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self.auth is not None and not self.auth.accepts_metadata(
                context.invocation_metadata()):
            self.service.metrics.reject("unauthenticated")
            raise ProxyError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def _answer(self, record: CallRecord, context: grpc.aio.ServicerContext,
                      call: Callable[[], Awaitable[bytes]]) -> bytes:
        """Authenticate, run `call`, and turn its ProxyError (or a bug) into the gRPC status
        every handler answers with."""
        try:
            self._authenticate(context)
            return await call()
        except ProxyError as err:
            record.code = err.code.name
            await context.abort(err.code, err.message)
        except Exception:
            await self._internal_error(record, context)
        raise AssertionError("unreachable: abort() raises")  # for the type checker

    async def predict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # _answer() inlined: on the hottest path a closure and a coroutine per call cost
        # more than the few lines repeated.
        with self.service.observe("grpc", "Predict") as record:
            try:
                self._authenticate(context)
                with self.service.validating():  # a bad value is the caller's mistake
                    priority = priority_of_metadata(context.invocation_metadata(), None)
                return await self.service.predict_bytes(request, context.time_remaining(),
                                                        record, priority)
            except ProxyError as err:
                record.code = err.code.name
                await context.abort(err.code, err.message)
            except Exception:
                await self._internal_error(record, context)
            raise AssertionError("unreachable: abort() raises")  # for the type checker

    def forwarder(self, path: str) -> Handler:
        method = path.rsplit("/", 1)[1]
        routed = path not in UNROUTED

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            # Counted under the model the request names, as a Predict is.
            model = model_of(request) if routed else ""
            with self.service.observe("grpc", method, model) as record:
                return await self._answer(record, context, lambda: self.service.forward(
                    path, request, context.time_remaining(), model=model))

        return forward

    async def reload_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self.service.observe("grpc", HANDLE_RELOAD_CONFIG.rsplit("/", 1)[1]) as record:
            async def apply() -> bytes:
                try:
                    message = services_pb2.ReloadConfigRequest.FromString(request)
                except DecodeError:
                    raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT,
                                     "Could not parse ReloadConfigRequest") from None
                if self.reload is None:
                    raise ProxyError(grpc.StatusCode.UNIMPLEMENTED,
                                     "this proxy has no model config to reload")
                try:
                    # No config in the request: read the config files again.
                    self.reload(message.config if message.HasField("config") else None)
                except ConfigError as err:  # refused: the old config stays
                    raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
                return services_pb2.ReloadConfigResponse(
                    status=get_model_status_pb2.StatusProto()).SerializeToString()
            return await self._answer(record, context, apply)

    @staticmethod
    async def _internal_error(record: CallRecord, context: grpc.aio.ServicerContext) -> None:
        """A bug: logged with its traceback, answered and counted as INTERNAL (grpcio would
        answer UNKNOWN with the exception's text)."""
        log.exception("gRPC %s failed", record.method)
        record.code = grpc.StatusCode.INTERNAL.name
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


def model_of(request: bytes) -> str:
    """The model a forwarded request names: its field 1 is a ModelSpec for every forwarded
    method but MultiInference (whose tasks each name one); "" when it cannot be told."""
    try:
        return model_spec_holder_pb2.ModelSpecHolder.FromString(request).model_spec.name
    except (DecodeError, ValueError):
        return ""


def _raw(handler: Handler) -> grpc.RpcMethodHandler:
    # No (de)serializers: the handler sees and returns the wire bytes.
    return grpc.unary_unary_rpc_method_handler(handler)


def generic_handlers(handlers: PredictionHandlers) -> list[grpc.GenericRpcHandler]:
    tables: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path in FORWARDED:
        service, method = path.strip("/").split("/")
        tables.setdefault(service, {})[method] = _raw(handlers.forwarder(path))
    tables[PREDICTION_SERVICE][PREDICT.rsplit("/", 1)[1]] = _raw(handlers.predict)
    service, method = HANDLE_RELOAD_CONFIG.strip("/").split("/")
    tables[service][method] = _raw(handlers.reload_config)
    return [grpc.method_handlers_generic_handler(service, table)
            for service, table in tables.items()]
