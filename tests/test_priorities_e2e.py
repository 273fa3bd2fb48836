"""Priorities on the real stack: the gRPC metadata key and the HTTP header are read on both
transports, a bad value is refused, and under an overload burst sheddable calls are refused
before critical ones. Counts only, never timings: the rules decide who is refused whatever
the machine's speed (the figures are in benchmarks/RESULTS.md, the exact rules in virtual
time in tests/engine/test_priorities.py)."""

from __future__ import annotations

import asyncio
import collections

import grpc
import numpy as np
import pytest
import requests
from grpc_client import predict_request, stub
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

SHEDDABLE = (("x-batchproxy-priority", "sheddable"),)
MAX_BATCH = 8
MAX_ENQUEUED_ROWS = 40  # sheddable calls are refused past 20


def by_priority(rest_url: str) -> dict[tuple[str, str], float]:
    """batchproxy_priority_requests_total by (priority, code)."""
    text = requests.get(f"{rest_url}/metrics", timeout=5).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "batchproxy_priority_requests_total":
                counts[sample.labels["priority"], sample.labels["code"]] = sample.value
    return counts


@pytest.fixture(scope="module")
def stack():
    # 500 ms per batch of at most 8 rows: 16 calls/s, so a burst of hundreds overloads it
    # however slowly a busy machine sends them.
    replica = start_replica("identity", batch_cost_ms=500)
    proxy = start_proxy([replica], max_batch_size=MAX_BATCH, batch_timeout_micros=2000,
                        max_enqueued_rows=MAX_ENQUEUED_ROWS)
    try:
        yield proxy
    finally:
        proxy.stop()
        replica.stop()


async def test_the_priority_is_read_on_both_transports_and_a_bad_value_refused(stack):
    before = by_priority(stack.rest_url)
    request = predict_request("identity", {"x": np.ones((1, 2), np.float32)})
    async with grpc.aio.insecure_channel(stack.address) as channel:
        client = stub(channel)
        await client.Predict(request, timeout=30, metadata=SHEDDABLE)
        await client.Predict(request, timeout=30,
                             metadata=(("x-batchproxy-priority", "critical"),))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.Predict(request, timeout=30,
                                 metadata=(("x-batchproxy-priority", "urgent"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "X-Batchproxy-Priority" in caught.value.details()
    assert "sheddable" in caught.value.details()

    url = f"{stack.rest_url}/v1/models/identity:predict"
    body = '{"instances": [[1, 2]]}'
    ok = requests.post(url, data=body, headers={"X-Batchproxy-Priority": "sheddable"},
                       timeout=30)
    assert ok.status_code == 200, ok.text
    lower = requests.post(url, data=body, headers={"x-batchproxy-priority": "Sheddable"},
                          timeout=30)
    assert lower.status_code == 200, lower.text
    bad = requests.post(url, data=body, headers={"X-Batchproxy-Priority": "urgent"},
                        timeout=30)
    assert bad.status_code == 400
    assert "critical" in bad.json()["error"] and "sheddable" in bad.json()["error"]

    after = by_priority(stack.rest_url)
    # Three sheddable calls (one gRPC, two REST) and one critical call were answered OK;
    # the refused ones never reached the queue.
    assert after[("sheddable", "OK")] - before.get(("sheddable", "OK"), 0) == 3
    assert after[("critical", "OK")] - before.get(("critical", "OK"), 0) == 1


async def test_an_overload_burst_refuses_sheddable_calls_before_critical_ones(stack):
    request = predict_request("identity", {"x": np.ones((1, 2), np.float32)})
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    async with grpc.aio.insecure_channel(stack.address) as channel:
        client = stub(channel)

        async def one(priority: str) -> None:
            metadata = SHEDDABLE if priority == "sheddable" else ()
            try:
                await client.Predict(request, timeout=60, metadata=metadata)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            outcomes[priority, code] += 1

        # Interleaved, so neither class arrives first.
        await asyncio.gather(*(one(priority) for _ in range(150)
                               for priority in ("critical", "sheddable")))
    codes = {code for _, code in outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, outcomes
    shed = outcomes["sheddable", "UNAVAILABLE"]
    refused_critical = outcomes["critical", "UNAVAILABLE"]
    assert shed > 0, outcomes  # the burst did overload the queue
    # Sheddable calls meet a bound half as high, and a critical call at a full queue takes
    # a sheddable call's place: whatever the arrival order, they are refused first.
    assert shed > refused_critical, outcomes
    assert outcomes["critical", "OK"] > outcomes["sheddable", "OK"], outcomes
    assert outcomes["critical", "OK"] >= MAX_ENQUEUED_ROWS // 2, outcomes
