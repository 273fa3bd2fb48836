"""Overload on the real stack: offered load far beyond capacity, bounded in count and time.
What must hold on any machine, however busy: every call is answered OK, UNAVAILABLE (refused)
or DEADLINE_EXCEEDED, never anything else; the replica's capacity stays in use; memory stays
bounded; and once the load drops every call succeeds again. How late, how fast and how much
are measurements: benchmarks/e2e/overload.py on the real stack, and the exact rules in
virtual time in tests/engine/test_overload.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import requests
from grpc_client import predict_request, stub
from load import closed_loop
from procs import free_port, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

# One replica at 80 ms per batch of at most 8 rows: capacity 100 calls/s.
BATCH_COST_MS = 80
MAX_BATCH = 8
CAPACITY = MAX_BATCH / (BATCH_COST_MS / 1000)
OFFERED = 5 * CAPACITY  # calls per second
DURATION_S = 8
DEADLINE_S = 1.0
RSS_BOUND_MB = 300


def predict_codes(monitoring_port: int) -> dict[str, float]:
    """What the proxy itself answered to Predict calls, by code."""
    text = requests.get(f"http://127.0.0.1:{monitoring_port}/metrics", timeout=5).text
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "batchproxy_requests_total" and \
                    sample.labels["method"] == "Predict":
                codes[sample.labels["code"]] = codes.get(sample.labels["code"], 0) + sample.value
    return codes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def open_loop(address: str, rate: float, duration_s: float, pid: int):
    """Calls at a fixed rate, each with a deadline; returns (outcomes, peak RSS)."""
    outcomes: list[tuple[str, float]] = []
    peak_rss = rss_mb(pid)
    request = predict_request("identity", {"x": np.ones((1, 4), np.float32)})
    async with grpc.aio.insecure_channel(address) as channel:
        client = stub(channel)

        async def one() -> None:
            started = time.monotonic()
            try:
                await client.Predict(request, timeout=DEADLINE_S)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            outcomes.append((code, time.monotonic() - started))

        tasks = []
        start = time.monotonic()
        total = int(rate * duration_s)
        next_rss = start
        for i in range(total):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
            if time.monotonic() >= next_rss:
                peak_rss = max(peak_rss, rss_mb(pid))
                next_rss += 0.5
        await asyncio.gather(*tasks)
    return outcomes, max(peak_rss, rss_mb(pid))


async def run_overload(duration_s: float = DURATION_S):
    """Baseline, overload and recovery against one proxy and replica: the figures that
    both this test and the benchmark read."""
    replica = start_replica("identity", batch_cost_ms=BATCH_COST_MS)
    monitoring = free_port()
    proxy = start_proxy([replica], max_batch_size=MAX_BATCH, batch_timeout_micros=2000,
                        monitoring_port=monitoring)
    try:
        baseline = await closed_loop(proxy.address, callers=16, duration_s=2)
        outcomes, peak_rss = await open_loop(proxy.address, OFFERED, duration_s, proxy.pid)
        stopped = time.monotonic()
        recovery = await closed_loop(proxy.address, callers=16, duration_s=2)
        first_after = time.monotonic() - stopped
        proxy_codes = predict_codes(monitoring)
    finally:
        proxy.stop()
        replica.stop()
    return baseline, outcomes, peak_rss, recovery, first_after, proxy_codes


async def test_overload_answers_every_call_keeps_memory_bounded_and_recovers():
    baseline, outcomes, peak_rss, recovery, _, proxy_codes = await run_overload()
    codes = {code for code, _ in outcomes}
    assert len(outcomes) == int(OFFERED * DURATION_S)
    assert codes <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    assert set(proxy_codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
    ok = sum(1 for code, _ in outcomes if code == "OK")
    refused = sum(1 for code, _ in outcomes if code == "UNAVAILABLE")
    assert ok > 0.3 * CAPACITY * DURATION_S  # capacity stays in use
    assert refused > 0  # the excess is refused, not queued without bound
    assert peak_rss < RSS_BOUND_MB, peak_rss
    assert baseline.failed == 0
    assert recovery.failed == 0  # back to normal once the load drops
