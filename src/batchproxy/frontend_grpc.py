"""The gRPC face of the proxy: tensorflow.serving.PredictionService and ModelService.

Handlers are generic and take raw bytes (no Python protobuf objects on the hot path):
Predict goes through the core decoder into the batcher; everything else is forwarded to a
replica untouched, and its status code and message come back unchanged."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from batchproxy import core
from batchproxy.batching import Batcher
from batchproxy.errors import ProxyError
from batchproxy.pool import PREDICT, ReplicaPool

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
FORWARDED = {
    PREDICTION_SERVICE: ("Classify", "Regress", "MultiInference", "GetModelMetadata"),
    MODEL_SERVICE: ("GetModelStatus", "HandleReloadConfigRequest"),
}

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class PredictionHandlers:
    def __init__(self, batcher: Batcher, pool: ReplicaPool) -> None:
        self.batcher = batcher
        self.pool = pool

    async def predict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            call = core.decode_predict_request(request)
        except core.CodecError as err:
            error = ProxyError.from_codec_error(err)
            await context.abort(error.code, error.message)
        try:
            if call.rows <= 0:
                # Not batchable (scalar inputs, disagreeing dimension 0, ...): the replica
                # answers it alone, exactly as TFS without batching would.
                return await self.pool.forward(PREDICT, request, context.time_remaining())
            return await self.batcher.submit(call, context.time_remaining())
        except ProxyError as err:
            await context.abort(err.code, err.message)

    def forwarder(self, path: str) -> Handler:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await self.pool.forward(path, request, context.time_remaining())
            except ProxyError as err:
                await context.abort(err.code, err.message)

        return forward


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
