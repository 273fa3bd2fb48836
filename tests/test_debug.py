"""The debug endpoint and cost metrics on a real proxy: after some batches, the learned cost
of the replica is shown per model, and exported to Prometheus."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import requests
from grpc_client import predict_request, stub
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy


async def test_learned_costs_are_shown_per_replica_and_model():
    with start_replica("identity", batch_cost_ms=20) as replica, start_proxy(
            [replica], batching_policy="adaptive", max_batch_size=8,
            health_interval_ms=50) as proxy:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            for size in (1, 3, 8, 2, 5, 8, 1, 4, 6, 7):
                await asyncio.gather(*(
                    client.Predict(predict_request("identity",
                                                   {"x": np.ones((1, 2), np.float32)}),
                                   timeout=10) for _ in range(size)))
        shown = requests.get(f"{proxy.rest_url}/v1/batchproxy/replicas", timeout=5).json()
        metrics = requests.get(f"{proxy.rest_url}/metrics", timeout=5).text
    (entry,) = shown["replicas"]
    assert entry["address"] == replica.address
    assert entry["state"] == "healthy" and entry["in_flight"] == 0
    # The round trip of its health checks (checked every 50 ms): a loopback call that costs
    # the replica nothing, far under a batch's 20 ms.
    assert 0 < entry["trip_ms"] < 20
    learned = entry["models"]["identity"]
    assert learned["batches"] >= 5
    assert learned["a_ms"] >= 15  # a batch costs 20 ms at the replica, more on the way
    assert learned["concurrency"] == 1
    assert 0 <= learned["spread"] < 1
    samples = {(s.labels.get("part"), s.labels.get("model")): s.value
               for family in text_string_to_metric_families(metrics)
               for s in family.samples if s.name == "batchproxy_replica_batch_cost_seconds"}
    assert samples[("fixed", "identity")] >= 0.015
    # The proxy's own turn from an answer to the next send: measured on a real loop (a
    # few batches of a few calls: some time, far under a batch's 20 ms).
    assert 0 < shown["turn_ms"] < 20
    (turn,) = [s.value for family in text_string_to_metric_families(metrics)
               for s in family.samples if s.name == "batchproxy_turn_seconds"]
    assert 0 <= turn < 0.02
