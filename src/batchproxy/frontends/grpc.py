"""The gRPC face of the proxy: tensorflow.serving.PredictionService and ModelService.

Handlers are generic and take raw bytes (no Python protobuf objects on the hot path):
Predict goes through the core decoder into the batcher; everything else is forwarded to a
replica untouched, and its status code and message come back unchanged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from batchproxy import codec
from batchproxy.auth import UNAUTHENTICATED_MESSAGE, TokenAuth
from batchproxy.engine.batching import Batcher
from batchproxy.errors import ProxyError
from batchproxy.frontends.limits import RequestLimits
from batchproxy.metrics import ProxyMetrics
from batchproxy.fleet.slots import PREDICT, ReplicaPool
from batchproxy.protos import model_spec_holder_pb2

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
FORWARDED = {
    PREDICTION_SERVICE: ("Classify", "Regress", "MultiInference", "GetModelMetadata"),
    MODEL_SERVICE: ("GetModelStatus", "HandleReloadConfigRequest"),
}

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class PredictionHandlers:
    def __init__(self, batcher: Batcher, pool: ReplicaPool,
                 metrics: ProxyMetrics | None = None, *, auth: TokenAuth | None = None,
                 limits: RequestLimits | None = None) -> None:
        self.batcher = batcher
        self.pool = pool
        self.metrics = metrics or batcher.metrics
        self.auth = auth
        self.limits = limits or RequestLimits()

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self.auth is not None and not self.auth.accepts_metadata(
                context.invocation_metadata()):
            self.metrics.reject("unauthenticated")
            raise ProxyError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def predict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        model = ""
        code = "OK"
        try:
            self._authenticate(context)
            call = codec.decode_predict_request(request)
            model = call.model_name
            try:
                self.limits.check(call)
            except ProxyError:
                self.metrics.reject("too_large")
                raise
            if call.rows <= 0:
                # Not batchable (scalar inputs, disagreeing dimension 0, ...): the replica
                # answers it alone, exactly as TFS without batching would.
                return await self.pool.forward(PREDICT, request, context.time_remaining(),
                                               model=model)
            return await self.batcher.submit(call, context.time_remaining())
        except codec.CodecError as err:
            error = ProxyError.from_codec_error(err)
            self.metrics.reject("invalid")
            code = error.code.name
            await context.abort(error.code, error.message)
        except ProxyError as err:
            code = err.code.name
            await context.abort(err.code, err.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.observe_call("grpc", "Predict", model, code,
                                      time.perf_counter() - started)

    def forwarder(self, path: str) -> Handler:
        method = path.rsplit("/", 1)[1]
        routed = method != "MultiInference"  # its tasks may name several models

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = "OK"
            try:
                self._authenticate(context)
                return await self.pool.forward(path, request, context.time_remaining(),
                                               model=model_of(request) if routed else "")
            except ProxyError as err:
                code = err.code.name
                await context.abort(err.code, err.message)
            finally:
                self.metrics.observe_call("grpc", method, "", code,
                                          time.perf_counter() - started)

        return forward


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
    services = []
    for service, methods in FORWARDED.items():
        table = {name: _raw(handlers.forwarder(f"/{service}/{name}")) for name in methods}
        if service == PREDICTION_SERVICE:
            table["Predict"] = _raw(handlers.predict)
        services.append(grpc.method_handlers_generic_handler(service, table))
    return services
