"""Hedging end to end: one of three reference replicas is stopped (SIGSTOP) under load. Its
batches are hedged on the others, so callers whose 2 s deadline is far above the healthy
latency all get their own answers; the hedges are counted in /metrics, within the budget.
The exact rules are proved in virtual time (tests/engine/test_hedging.py); the bounds here
hold on a busy two-core machine."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
import requests
from grpc_client import predict_request, stub, to_array
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

CALLERS = 24
WARM_S, STOPPED_S, AFTER_S = 2.0, 3.0, 1.0


def samples(rest_url: str, name: str) -> dict[str, float]:
    """{outcome or replica label: value} of one counter family."""
    text = requests.get(f"{rest_url}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get("outcome") or sample.labels.get("replica", "")
                found[key] = found.get(key, 0.0) + sample.value
    return found


async def test_a_stopped_replica_s_batches_are_hedged_and_every_caller_answered():
    replicas = [start_replica("identity", batch_cost_ms=20) for _ in range(3)]
    proxy = start_proxy(replicas, batching_policy="adaptive", max_batch_size=8,
                        replica_timeout_s=10)
    stopped = replicas[0]
    codes: dict[str, int] = {}
    wrong = 0
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            await client.Predict(predict_request("identity", {"x": np.ones((1, 1),
                                                                           np.float32)}),
                                 timeout=10)
            started = time.monotonic()
            end = started + WARM_S + STOPPED_S + AFTER_S

            async def caller(index: int) -> None:
                nonlocal wrong
                sequence = 0
                while time.monotonic() < end:
                    value = np.full((1, 1), index * 100_000 + sequence, np.float32)
                    sequence += 1
                    try:
                        answer = await client.Predict(
                            predict_request("identity", {"x": value}), timeout=2)
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] = codes.get(err.code().name, 0) + 1
                        continue
                    codes["OK"] = codes.get("OK", 0) + 1
                    if not np.array_equal(to_array(answer.outputs["y"]), value):
                        wrong += 1

            async def stop_one() -> None:
                await asyncio.sleep(WARM_S)
                stopped.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(STOPPED_S)
                finally:
                    stopped.signal(signal.SIGCONT)

            await asyncio.gather(stop_one(), *(caller(i) for i in range(CALLERS)))
            elapsed = time.monotonic() - started
        hedged = samples(proxy.rest_url, "batchproxy_hedged_batches_total")
        batches = sum(samples(proxy.rest_url, "batchproxy_batches_total").values())
    finally:
        stopped.signal(signal.SIGCONT)
        proxy.stop()
        for replica in replicas:
            replica.stop()
    assert wrong == 0
    # 2 s is far above the healthy latency (tens of ms): nobody waits out the stopped
    # replica, and nobody is refused.
    assert set(codes) == {"OK"}, codes
    assert hedged["won"] >= 1, hedged
    spent = hedged["won"] + hedged["lost"] + hedged["failed"]
    assert spent <= 3 + 0.05 * batches + elapsed + 1, (hedged, batches)
