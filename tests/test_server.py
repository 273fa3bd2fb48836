"""The proxy process's lifecycle: every stop step runs even when one fails, SIGTERM exits in
bounded time with a hung replica, and a task that keeps failing stops the process."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_client import predict_request, stub
from procs import HOST, free_port, start_replica
from proxy_procs import start_proxy

from batchproxy import server
from batchproxy.config import ProxyConfig


def config(**overrides) -> ProxyConfig:
    settings = dict(host=HOST, port=0, rest_api_port=free_port(), health_interval_ms=100,
                    drain_timeout_s=1.0)
    settings.update(overrides)
    return ProxyConfig(**settings)


async def test_a_failing_stop_step_does_not_skip_the_others():
    proxy = server.Proxy(config(), ["127.0.0.1:1"])
    await proxy.start()
    ran: list[str] = []

    async def failing_close() -> None:
        ran.append("health_checker")
        raise RuntimeError("close failed")

    pool_close = proxy.pool.close

    async def close_pool() -> None:
        ran.append("pool")
        await pool_close()

    proxy.health_checker.close = failing_close  # type: ignore[method-assign]
    proxy.pool.close = close_pool  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="close failed"):
        await proxy.stop(grace_s=0.2)
    assert ran == ["health_checker", "pool"]  # the steps after the failure still ran
    assert proxy.supervisor.names == []  # every background task was stopped
    assert proxy.rest is not None and proxy.rest.signatures._task is None


async def test_a_background_task_that_keeps_failing_stops_the_proxy(monkeypatch):
    def broken_sampler(self) -> None:
        raise ValueError("broken gauge")

    monkeypatch.setattr(server.Proxy, "_sample_gauges", broken_sampler)
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(server.SupervisionFailed, match="gauge_sampler"):
            await asyncio.wait_for(server.run(config(), ["127.0.0.1:1"]), 10)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def test_sigterm_exits_in_bounded_time_with_a_hung_replica():
    replica = start_replica("identity")
    drain_s = 1.0
    proxy = start_proxy([replica], drain_timeout_s=drain_s, health_interval_ms=5000)
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            request = predict_request("identity", {"x": np.ones((1, 2), np.float32)})
            await client.Predict(request, timeout=10)  # healthy and connected
            replica.signal(signal.SIGSTOP)  # the connection stays open, nothing is answered
            calls = [asyncio.ensure_future(client.Predict(request, timeout=30))
                     for _ in range(4)]
            await asyncio.sleep(0.3)  # the calls are at the replica
            started = time.monotonic()
            proxy.signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, proxy.popen.wait,
                                                                    drain_s + 10)
            exited_after = time.monotonic() - started
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        replica.signal(signal.SIGCONT)
        proxy.stop()
        replica.stop()
    assert code == 0
    assert exited_after < drain_s + 2, exited_after
    for result in results:  # told, not left hanging until their own deadline
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.UNAVAILABLE, result
