"""The reference replica's gRPC server (tensorflow.serving.PredictionService and ModelService)
and its lifecycle together with the REST app.

Predict is registered with a generic handler on raw bytes: the request goes straight to the
wire codec (`batchproxy.core`) and the answer comes back serialized, as in the proxy, so the
replica is cheap enough to measure the proxy against.

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from batchproxy import codec
from batchproxy.protos import get_model_metadata_pb2, get_model_status_pb2, inference_pb2
from batchproxy.replica import examples
from batchproxy.replica.metrics import ReplicaMetrics
from batchproxy.replica.models import ReplicaError, load_model
from batchproxy.replica.rest import make_app
from batchproxy.replica.service import ReplicaService, not_implemented
from batchproxy.replica.versions import VersionDefaults, VersionManager, VersionPolicy
from batchproxy.tls import ServerTLS

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1024  # TFS cuts status messages there
GRPC_OPTIONS = [
    # TFS accepts and sends messages up to INT32_MAX both ways.
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # gRPC sets SO_REUSEPORT by default: two test replicas could then share a port without
    # an error. A taken port must fail loudly instead.
    ("grpc.so_reuseport", 0),
]
# Classify and Regress are always registered: the service refuses them (UNIMPLEMENTED) for a
# model that does not define them.
UNIMPLEMENTED = {
    "tensorflow.serving.PredictionService": ("MultiInference",),
    "tensorflow.serving.ModelService": ("HandleReloadConfigRequest",),
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ReplicaRpcs:
    """gRPC method handlers over a ReplicaService, counting every answer by code."""

    def __init__(self, service: ReplicaService) -> None:
        self.service = service
        self.metrics = service.metrics

    def wrap(self, method: str, func: Callable[[Any], Awaitable[Any]]) -> Handler:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = await func(request)
            except ReplicaError as err:
                code, message = err.code, err.message
            except codec.CodecError as err:
                code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)
                message = err.message
            except asyncio.CancelledError:
                self.metrics.count(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as err:  # a bug in the replica: say so rather than hang up
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, f"replica error: {err!r}"
            else:
                self.metrics.count(method, grpc.StatusCode.OK)
                return response
            self.metrics.count(method, code)
            await context.abort(code, message[:MAX_MESSAGE_CHARS])

        return handler

    async def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return self.service.metadata(request)

    async def status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return self.service.status(request)

    async def classify(
        self, request: inference_pb2.ClassificationRequest
    ) -> inference_pb2.ClassificationResponse:
        return examples.classify(self.service, request)

    async def regress(
        self, request: inference_pb2.RegressionRequest
    ) -> inference_pb2.RegressionResponse:
        return examples.regress(self.service, request)

    def unimplemented(self, service: str, method: str) -> Callable[[bytes], Awaitable[bytes]]:
        async def refuse(_: bytes) -> bytes:
            self.service.check_available()
            raise not_implemented(
                f"{service}/{method}",
                "it serves Predict, GetModelMetadata, GetModelStatus, and Classify and "
                "Regress for models that define them",
            )

        return refuse

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        meta, status, inference = get_model_metadata_pb2, get_model_status_pb2, inference_pb2
        prediction: dict[str, grpc.RpcMethodHandler] = {
            # Raw bytes both ways: no deserializer, no serializer.
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.wrap("Predict", self.service.predict)
            ),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self.wrap("GetModelMetadata", self.metadata),
                request_deserializer=meta.GetModelMetadataRequest.FromString,
                response_serializer=meta.GetModelMetadataResponse.SerializeToString,
            ),
            "Classify": grpc.unary_unary_rpc_method_handler(
                self.wrap("Classify", self.classify),
                request_deserializer=inference.ClassificationRequest.FromString,
                response_serializer=inference.ClassificationResponse.SerializeToString,
            ),
            "Regress": grpc.unary_unary_rpc_method_handler(
                self.wrap("Regress", self.regress),
                request_deserializer=inference.RegressionRequest.FromString,
                response_serializer=inference.RegressionResponse.SerializeToString,
            ),
        }
        model: dict[str, grpc.RpcMethodHandler] = {
            "GetModelStatus": grpc.unary_unary_rpc_method_handler(
                self.wrap("GetModelStatus", self.status),
                request_deserializer=status.GetModelStatusRequest.FromString,
                response_serializer=status.GetModelStatusResponse.SerializeToString,
            ),
        }
        tables = {
            "tensorflow.serving.PredictionService": prediction,
            "tensorflow.serving.ModelService": model,
        }
        for service, methods in UNIMPLEMENTED.items():
            for method in methods:
                tables[service][method] = grpc.unary_unary_rpc_method_handler(
                    self.wrap(method, self.unimplemented(service, method))
                )
        return [
            grpc.method_handlers_generic_handler(service, table)
            for service, table in tables.items()
        ]


class Replica:
    """One reference replica in this process: gRPC server plus REST app on the running loop.

    `await start()` binds both ports (0 picks a free port; `rest_api_port=None` or 0 disables
    REST, as TFS's --rest_api_port=0 does) and sets `.port` / `.rest_port`; `await stop()`."""

    def __init__(
        self,
        *,
        port: int = 8500,
        rest_api_port: int | None = 8501,
        model_name: str | None = None,
        model_kind: str = "identity",
        model_version: int = 1,
        batch_cost_ms: float = 0.0,
        row_cost_us: float = 0.0,
        tensor_content: bool = False,
        check_numerics: bool = False,
        host: str = "0.0.0.0",
        ssl_config_file: str | None = None,
        model_base_path: str | None = None,
        file_system_poll_wait_seconds: float = 1.0,
        model_version_policy: str = "latest",
    ) -> None:
        self.host = host
        self.ssl_config_file = ssl_config_file
        self.requested_port = port
        self.requested_rest_port = rest_api_port
        name = model_name or model_kind
        # With a base path the versions come from its folders (versions.py); without, one
        # fixed version of --model.
        self.versions = None if model_base_path is None else VersionManager(
            model_base_path,
            name,
            policy=VersionPolicy.parse(model_version_policy),
            poll_s=file_system_poll_wait_seconds,
            defaults=VersionDefaults(model_kind, batch_cost_ms, row_cost_us),
        )
        self.service = ReplicaService(
            load_model(model_kind),
            name,
            model_version,
            tensor_content=tensor_content,
            check_numerics=check_numerics,
            batch_cost_ms=batch_cost_ms,
            row_cost_us=row_cost_us,
            metrics=ReplicaMetrics(),
            versions=self.versions,
        )
        self.port = 0
        self.rest_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if self.versions is not None:
            # As TFS: the versions there now are loaded before the ports open.
            await self.versions.start()
        # REST first: once the gRPC port answers (what callers wait for), REST is up too.
        if self.requested_rest_port:
            self._runner = web.AppRunner(make_app(self.service), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.requested_rest_port)
            await site.start()
            self.rest_port = self._runner.addresses[0][1]
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        self._server.add_generic_rpc_handlers(ReplicaRpcs(self.service).handlers())
        address = f"{self.host}:{self.requested_port}"
        if self.ssl_config_file:
            credentials = ServerTLS.from_tfs_file(self.ssl_config_file).grpc_credentials()
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        svc = self.service
        runner = svc.runner
        served = (f"versions {sorted(svc.servables)} (policy {self.versions.policy.kind}) of "
                  f"{self.versions.base}, latest" if self.versions is not None else "version")
        log.info(
            "batchproxy reference replica (development and tests only, not for production "
            "traffic): model %s served as %r %s %d, gRPC port %d, REST port %s, "
            "core %s, cost %.3f ms + %.3f us/row, outputs as %s",
            svc.model.name, svc.model_name, served, svc.version, self.port,
            self.rest_port or "off",
            codec.IMPLEMENTATION, runner.batch_cost_ms, runner.row_cost_us,
            "typed fields" if svc.typed else "tensor_content",
        )

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.versions is not None:
            await self.versions.stop()
