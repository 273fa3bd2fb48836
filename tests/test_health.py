"""grpc.health.v1 on the proxy's gRPC port: SERVING only while a replica is healthy."""

from __future__ import annotations

import asyncio
import signal

import grpc
from procs import start_replica
from proxy_procs import start_proxy

from batchproxy.protos import health_pb2

CHECK = "/grpc.health.v1.Health/Check"


async def check(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        response = await call(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return response.status


async def wait_for_status(address: str, status: int, within_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        if await check(address) == status:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_serving_follows_replica_health():
    replica = start_replica("identity")
    proxy = start_proxy([replica], health_interval_ms=200)
    try:
        assert await wait_for_status(proxy.address, health_pb2.HealthCheckResponse.SERVING, 5)
        assert await check(proxy.address, "tensorflow.serving.PredictionService") == \
            health_pb2.HealthCheckResponse.SERVING
        replica.popen.send_signal(signal.SIGKILL)
        replica.popen.wait()
        assert await wait_for_status(proxy.address, health_pb2.HealthCheckResponse.NOT_SERVING,
                                     5)
    finally:
        proxy.stop()
        replica.stop()


async def test_unknown_service_is_not_found():
    replica = start_replica("identity")
    proxy = start_proxy([replica])
    try:
        try:
            await check(proxy.address, "no.such.Service")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("an unknown service must be NOT_FOUND")
    finally:
        proxy.stop()
        replica.stop()
