"""The engine's liveness and deadline rules end to end: real replica and proxy processes on
loopback, real gRPC clients. The exact timing rules are proved in virtual time
(tests/engine/); these check the same cases survive the real stack, with bounds that hold on
a busy two-core machine."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
import requests
from grpc_client import batch_rows_histogram, predict_request, stub, to_array
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy


def replica_predicts(replica) -> float:
    """Predict calls the replica answered, whatever their status."""
    text = requests.get(f"{replica.rest_url}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "batchproxy_replica_requests_total"
                    and sample.labels.get("method") == "Predict"):
                total += sample.value
    return total


def rows(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 1), value, np.float32)


async def test_rows_left_after_a_full_batch_go_to_the_idle_replica_at_their_due_time():
    # Max batch 4: a 1-row call and a 4-row call fill one batch and leave one row over; a
    # 1-row call joins it. The left-over row and the last call leave together, at their due
    # time, on the idle second replica: the last call costs one replica call, not two.
    # The fixed rule's due time (adaptive sends a lone row to an idle replica at once).
    replicas = [start_replica("identity", batch_cost_ms=500) for _ in range(2)]
    proxy = start_proxy(replicas, max_batch_size=4, batch_timeout_micros=50_000,
                        health_interval_ms=200, batching_policy="fixed")
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            await client.Predict(predict_request("identity", {"x": rows(4)}), timeout=10)
            before = sum(batch_rows_histogram(r.rest_url).get("count", 0) for r in replicas)
            first = client.Predict(predict_request("identity", {"x": rows(1, 1)}), timeout=10)
            second = client.Predict(predict_request("identity", {"x": rows(4, 2)}),
                                    timeout=10)
            await asyncio.sleep(0.0005)
            started = time.monotonic()
            last = await client.Predict(predict_request("identity", {"x": rows(1, 3)}),
                                        timeout=10)
            last_took = time.monotonic() - started
            answers = await asyncio.gather(first, second)
        after = sum(batch_rows_histogram(r.rest_url).get("count", 0) for r in replicas)
    finally:
        proxy.stop()
        for replica in replicas:
            replica.stop()
    np.testing.assert_array_equal(to_array(last.outputs["y"]), rows(1, 3))
    np.testing.assert_array_equal(to_array(answers[1].outputs["y"]), rows(4, 2))
    assert after - before == 2
    # One replica call is 0.5 s; waiting for the first replica to free would be 1 s.
    assert last_took < 0.9, last_took


async def test_a_caller_with_no_deadline_never_inherits_a_batch_mates_deadline():
    # Replica "a" is stopped (SIGSTOP): whatever batch it holds never comes back. Callers
    # with a 2 s deadline sharing such a batch get DEADLINE_EXCEEDED; the caller with none
    # is retried on "b" when the proxy gives up on "a" (replica timeout) and gets its answer.
    hung = start_replica("identity", batch_cost_ms=20)
    healthy = start_replica("identity", batch_cost_ms=20)
    proxy = start_proxy([hung, healthy], max_batch_size=8, batch_timeout_micros=20_000,
                        replica_timeout_s=4, health_interval_ms=30_000)
    deadline_errors = 0
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            await client.Predict(predict_request("identity", {"x": rows(1)}), timeout=10)
            hung.signal(signal.SIGSTOP)
            # The fleet picks a replica at random: rounds until one batch meets the stopped
            # one (a round on the healthy one takes ~50 ms; 20 misses have odds of 1e-6).
            for round_ in range(20):
                tight = [client.Predict(predict_request("identity", {"x": rows(1, i)}),
                                        timeout=2) for i in range(3)]
                patient = client.Predict(
                    predict_request("identity", {"x": rows(1, 100 + round_)}))
                results = await asyncio.gather(*tight, patient, return_exceptions=True)
                answer = results[-1]
                assert not isinstance(answer, Exception), answer
                np.testing.assert_array_equal(to_array(answer.outputs["y"]),
                                              rows(1, 100 + round_))
                for result in results[:-1]:
                    if isinstance(result, grpc.aio.AioRpcError):
                        assert result.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        deadline_errors += 1
                if deadline_errors:
                    break
    finally:
        hung.signal(signal.SIGCONT)
        proxy.stop()
        hung.stop()
        healthy.stop()
    assert deadline_errors, "no batch reached the stopped replica"


async def test_thirty_two_uniformly_invalid_calls_cost_at_most_eight_replica_calls():
    # The fixed rule: the 32 calls gather for the 300 ms timeout into one batch, whose
    # bisection the bound is about. Adaptive sends calls to the idle replica as they arrive
    # (it refuses at once, so it is idle again for the next): 30 replica calls for the 32,
    # none more than a call's own.
    replica = start_replica("identity", check_numerics=True)
    proxy = start_proxy([replica], max_batch_size=32, batch_timeout_micros=300_000,
                        batching_policy="fixed")
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            client = stub(channel)
            await client.Predict(predict_request("identity", {"x": rows(1)}), timeout=10)
            before = replica_predicts(replica)
            results = await asyncio.gather(
                *(client.Predict(predict_request("identity", {"x": rows(1, np.nan)}),
                                 timeout=20) for _ in range(32)), return_exceptions=True)
        spent = replica_predicts(replica) - before
    finally:
        proxy.stop()
        replica.stop()
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert spent <= 8, spent
