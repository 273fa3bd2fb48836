"""Is this proxy alive, and ready for traffic? Answered over grpc.health.v1 and over REST
(`/healthz` live, `/readyz` ready). Ready means: not draining, every background task
running (a dead health checker or scheduler would leave the proxy answering from stale
state), and at least one replica healthy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from batchproxy.fleet.slots import ReplicaPool
from batchproxy.protos import health_pb2
from batchproxy.supervisor import Supervisor

SERVICES = frozenset({"", "tensorflow.serving.PredictionService",
                      "tensorflow.serving.ModelService"})
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(self, pool: ReplicaPool, supervisor: Supervisor | None = None) -> None:
        self.pool = pool
        self.supervisor = supervisor
        self.draining = False

    def ready(self) -> bool:
        return self.reason() == "ready"

    def reason(self) -> str:
        if self.draining:
            return "draining"
        if self.supervisor is not None and not self.supervisor.healthy:
            return f"background task down: {self.supervisor.reason()}"
        return "ready" if self.pool.any_healthy() else "no healthy replica"

    # -- grpc.health.v1 ---------------------------------------------------------------------

    def _status(self, request: bytes) -> bytes:
        service = health_pb2.HealthCheckRequest.FromString(request).service
        if service not in SERVICES:
            raise KeyError(service)
        status = SERVING if self.ready() else NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()

    async def check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return self._status(request)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            raise  # abort() raises; this line only tells the type checker

    async def watch(self, request: bytes,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        last = None
        while True:
            try:
                status = self._status(request)
            except KeyError:
                status = health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN).SerializeToString()
            if status != last:
                last = status
                yield status
            await asyncio.sleep(0.25)

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(self.check),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch),
        })

    # -- REST --------------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready_endpoint(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"status": self.reason()}, status=200 if ready else 503)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self.live), web.get("/readyz", self.ready_endpoint)]
