"""Prometheus series of the proxy, scraped by a real Prometheus server."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import requests
from grpc_client import predict_request, stub
from procs import free_port, start_replica
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import Prometheus, prometheus_binary
from proxy_procs import start_proxy

from batchproxy.metrics import ProxyMetrics


def test_series_follow_prometheus_naming():
    names = [family.name for family in ProxyMetrics().registry.collect()]
    assert names
    for name in names:
        assert name.startswith("batchproxy_")
        assert not name.endswith("_total")  # the client adds it to counters' samples
    units = {"batchproxy_request_duration_seconds", "batchproxy_queue_wait_seconds"}
    assert units <= set(names)


async def send(address: str, rows: list[int]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        client = stub(channel)
        await asyncio.gather(*(
            client.Predict(predict_request("identity", {"x": np.ones((n, 4), np.float32)}),
                           timeout=20)
            for n in rows))


async def test_prometheus_scrape_counts_what_was_sent():
    prometheus_binary()  # skips when it is missing, before anything is started
    monitoring = free_port()
    with start_replica("identity", batch_cost_ms=5) as replica, \
            start_proxy([replica], monitoring_port=monitoring, max_batch_size=16) as proxy, \
            Prometheus([f"127.0.0.1:{monitoring}"]) as prometheus:
        rng = np.random.default_rng(3)
        rows = [int(n) for n in rng.integers(1, 6, size=300)]
        for start in range(0, len(rows), 100):  # bounded load, in three waves
            await send(proxy.address, rows[start:start + 100])
        ok = 'sum(batchproxy_requests_total{method="Predict",code="OK"})'
        assert prometheus.wait_for(ok, 300) == 300
        assert prometheus.wait_for("sum(batchproxy_batch_rows_sum)", sum(rows)) == sum(rows)
        batches = prometheus.scalar("sum(batchproxy_batch_rows_count)")
        assert batches is not None and batches < 300  # rows were merged
        assert prometheus.scalar("sum(batchproxy_batches_total)") == batches
        healthy = prometheus.query("batchproxy_replica_healthy")
        assert [float(r["value"][1]) for r in healthy] == [1.0]


def scrape(url: str) -> dict[str, list]:
    text = requests.get(url, timeout=5).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def test_workers_share_ports_and_one_scrape_covers_both():
    monitoring = free_port()
    with start_replica("identity") as replica, \
            start_proxy([replica], monitoring_port=monitoring, workers=2) as proxy:
        # SO_REUSEPORT spreads connections, not calls: use many connections.
        for _ in range(40):
            await send(proxy.address, [1, 2])
        await asyncio.sleep(0.5)  # state gauges are sampled a few times a second
        families = scrape(f"http://127.0.0.1:{monitoring}/metrics")
        requests_ok = sum(s.value for s in families["batchproxy_requests"]
                          if s.name == "batchproxy_requests_total"
                          and s.labels["code"] == "OK")
        per_worker = {s.labels["pid"]: s.value for s in families["batchproxy_worker_calls"]}
    assert requests_ok == 80
    assert len(per_worker) == 2, per_worker
    assert all(value > 0 for value in per_worker.values()), per_worker
