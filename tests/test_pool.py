"""The replica fleet under failure: real replica and proxy processes on loopback."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
import pytest
import requests
from grpc_client import batch_rows_histogram, predict_request, stub, to_array
from load import UNMATCHED_AT_SHUTDOWN, closed_loop
from procs import free_port, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

HEALTH_MS = 200


def batches(replica) -> float:
    return batch_rows_histogram(replica.rest_url).get("count", 0)


def proxy_series(monitoring_port: int, name: str, replica: str) -> float | None:
    text = requests.get(f"http://127.0.0.1:{monitoring_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("replica") == replica:
                return sample.value
    return None


async def test_kill_9_of_one_replica_under_load_loses_no_call():
    replicas = [start_replica("identity", batch_cost_ms=2) for _ in range(3)]
    monitoring = free_port()
    proxy = start_proxy(replicas, health_interval_ms=HEALTH_MS, max_batch_size=16,
                        batch_timeout_micros=2000, monitoring_port=monitoring)
    victim = replicas[0]
    try:
        load = asyncio.ensure_future(closed_loop(proxy.address, callers=200, duration_s=10))
        await asyncio.sleep(3)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
        # Once ejected, the dead replica is sent no new batch.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2
        while (proxy_series(monitoring, "batchproxy_replica_healthy", victim.address) != 0
               and loop.time() < deadline):
            await asyncio.sleep(0.05)
        assert proxy_series(monitoring, "batchproxy_replica_healthy", victim.address) == 0
        sent_when_ejected = proxy_series(monitoring, "batchproxy_batches_total", victim.address)
        await asyncio.sleep(2.5)
        assert proxy_series(monitoring, "batchproxy_batches_total",
                            victim.address) == sent_when_ejected
        # Restarted on the same port, it must get work again within two health intervals.
        restarted = start_replica("identity", batch_cost_ms=2, port=victim.port,
                                  rest_port=victim.rest_port)
        replicas.append(restarted)  # the killed one stays listed: stop() removes its log
        ready = time.monotonic()
        while batches(restarted) == 0 and time.monotonic() - ready < 5:
            await asyncio.sleep(0.02)
        rejoined_after = time.monotonic() - ready
        result = await load
        proxy_log = proxy.output()
    finally:
        proxy.stop()
        for replica in replicas:
            replica.stop()
    assert result.wrong == 0
    assert result.failed == 0, result.error_messages
    assert result.ok > 1000
    assert rejoined_after < 2 * HEALTH_MS / 1000 + 0.3, f"rejoined after {rejoined_after:.2f}s"
    assert "-> ejected" in proxy_log


async def test_a_replica_whose_model_turns_unavailable_gets_none_of_its_batches():
    replicas = [start_replica("identity") for _ in range(2)]
    proxy = start_proxy(replicas, health_interval_ms=HEALTH_MS, health_check_model="identity")
    try:
        first = await closed_loop(proxy.address, callers=20, duration_s=1)
        assert first.ok and not first.failed
        assert batches(replicas[1]) > 0
        requests.post(f"{replicas[1].rest_url}/admin/state", json={"state": "UNLOADING"},
                      timeout=5).raise_for_status()
        await asyncio.sleep(3 * HEALTH_MS / 1000)
        before = batches(replicas[1])
        second = await closed_loop(proxy.address, callers=20, duration_s=1)
        assert second.ok and not second.failed, second.error_messages
        assert batches(replicas[1]) == before
        # With the model unavailable everywhere, calls are refused at once, not queued.
        requests.post(f"{replicas[0].rest_url}/admin/state", json={"state": "UNLOADING"},
                      timeout=5).raise_for_status()
        await asyncio.sleep(3 * HEALTH_MS / 1000)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub(channel).Predict(
                    predict_request("identity", {"x": np.ones((1, 2))}), timeout=5)
            assert time.monotonic() - started < 0.5
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.stop()
        for replica in replicas:
            replica.stop()


async def test_one_poisoned_call_fails_alone_and_its_batch_mates_are_answered():
    replica = start_replica("identity", check_numerics=True)
    proxy = start_proxy([replica], max_batch_size=64, batch_timeout_micros=200_000)
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            inputs = [np.full((1, 3), i, np.float32) for i in range(20)]
            inputs[7] = np.array([[1.0, np.nan, 2.0]], np.float32)
            results = await asyncio.gather(
                *(client.Predict(predict_request("identity", {"x": x}), timeout=10)
                  for x in inputs), return_exceptions=True)
    finally:
        proxy.stop()
        replica.stop()
    for i, (x, result) in enumerate(zip(inputs, results, strict=True)):
        if i == 7:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert not isinstance(result, Exception), result
            np.testing.assert_array_equal(to_array(result.outputs["y"]), x)


async def test_sigterm_under_load_answers_every_accepted_call():
    replica = start_replica("identity", batch_cost_ms=100)
    proxy = start_proxy([replica], max_batch_size=8, batch_timeout_micros=1000,
                        drain_timeout_s=10)
    stop = asyncio.Event()
    load = asyncio.ensure_future(closed_loop(proxy.address, callers=50, duration_s=8,
                                             timeout_s=8, stop=stop))
    try:
        await asyncio.sleep(1.5)
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, proxy.popen.wait, 15)
        exited_after = time.monotonic() - started
        stop.set()
        result = await load
    finally:
        proxy.stop()
        replica.stop()
    assert code == 0
    assert exited_after < 10
    assert result.wrong == 0
    # Calls sent after the proxy stopped listening are refused (UNAVAILABLE, or grpc's
    # CANCELLED for one that reached the port but no handler: load.UNMATCHED_AT_SHUTDOWN);
    # no call that was accepted ends in any other error.
    assert set(result.errors) <= {"UNAVAILABLE", UNMATCHED_AT_SHUTDOWN}, result.error_messages
    assert result.ok > 50


async def test_a_slow_replica_receives_a_smaller_share():
    fast = start_replica("identity", batch_cost_ms=10)
    slow = start_replica("identity", batch_cost_ms=50)
    proxy = start_proxy([fast, slow], max_batch_size=8, batch_timeout_micros=1000)
    try:
        result = await closed_loop(proxy.address, callers=64, duration_s=4)
        fast_batches, slow_batches = batches(fast), batches(slow)
    finally:
        proxy.stop()
        fast.stop()
        slow.stop()
    assert result.ok and not result.failed
    assert slow_batches < 0.5 * fast_batches, (fast_batches, slow_batches)
