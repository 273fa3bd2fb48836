"""The gRPC face of the proxy: tensorflow.serving.PredictionService and ModelService.

Handlers are generic and take raw bytes (no Python protobuf objects on the hot path):
Predict goes to the predict service (core decoder, then the engine's batch queues);
everything else is forwarded to a replica untouched, and its status code and message come
back unchanged; but HandleReloadConfigRequest, which is refused (RELOAD_REFUSAL says why)."""

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
from batchproxy.priority import priority_of_metadata
from batchproxy.protos import model_spec_holder_pb2

log = logging.getLogger(__name__)

# Forwarded to a replica unchanged. MultiInference's tasks may name several models, so it
# is not routed by model.
FORWARDED = (CLASSIFY, REGRESS, MULTI_INFERENCE, GET_MODEL_METADATA, GET_MODEL_STATUS)
UNROUTED = frozenset({MULTI_INFERENCE})
# Forwarded, a reload would reconfigure whichever one replica took the call and leave the
# rest of the fleet as it was; the proxy has no model config of its own to reload.
RELOAD_REFUSAL = (
    "HandleReloadConfigRequest is not supported by batchproxy: it would reconfigure one "
    "replica of the fleet, not all of them, and the proxy has no model config of its own. "
    "Send it to each TensorFlow Serving replica directly.")

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class PredictionHandlers:
    """gRPC transport only: authentication, deadlines and status codes. What a call means
    is the predict service's business."""

    def __init__(self, service: PredictService, *, auth: TokenAuth | None = None) -> None:
        self.service = service
        self.auth = auth

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
                    priority = priority_of_metadata(context.invocation_metadata())
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
            async def refuse() -> bytes:
                raise ProxyError(grpc.StatusCode.UNIMPLEMENTED, RELOAD_REFUSAL)
            return await self._answer(record, context, refuse)

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
