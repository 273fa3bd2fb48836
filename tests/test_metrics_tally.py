"""Tallied hot-path observations (metrics.Tally, metrics.HistogramTally) expose exactly what
prometheus-client's own inc() and observe() would, once read."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from batchproxy.metrics import LATENCY_BUCKETS, HistogramTally, ProxyMetrics, Tally

VALUES = [0.0, 0.0001, 0.00011, 0.0025, 0.003, 7.0, 30.0, 31.0, 1e9, -1.0, 0.0001]


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    return (direct, Histogram("h", "h", ["a"], buckets=LATENCY_BUCKETS, registry=direct),
            tallied, Histogram("h", "h", ["a"], buckets=LATENCY_BUCKETS, registry=tallied))


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_histogram_tally_flush_matches_observe_on_bucket_edges_and_beyond():
    direct, plain, tallied, buffered = _pair()
    tally = HistogramTally(buffered.labels("x"))
    for value in VALUES:
        plain.labels("x").observe(value)
        tally.observe(value)
    tally.flush()
    assert _without_created(generate_latest(direct)) == _without_created(
        generate_latest(tallied))
    tally.flush()  # nothing pending: nothing added twice
    assert _without_created(generate_latest(direct)) == _without_created(
        generate_latest(tallied))


def test_histogram_tally_nan_goes_to_the_sum_only_as_observe_does():
    direct, plain, tallied, buffered = _pair()
    tally = HistogramTally(buffered.labels("x"))
    plain.labels("x").observe(math.nan)
    tally.observe(math.nan)
    tally.flush()
    assert _without_created(generate_latest(direct)) == _without_created(
        generate_latest(tallied))


def test_counter_tally_adds_on_flush():
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    tally = Tally(counter)
    tally.inc()
    tally.inc(4)
    assert registry.get_sample_value("c_total") == 0
    tally.flush()
    tally.flush()
    assert registry.get_sample_value("c_total") == 5


def test_reading_the_registry_sees_every_tallied_observation():
    metrics = ProxyMetrics()
    for _ in range(3):
        metrics.observe_call("grpc", "Predict", "m", "OK", 0.002)
    metrics.observe_batch("r:1", 5, 3)
    metrics.observe_priority("critical", "OK")
    metrics.queue_wait_tally.observe(0.0003)
    value = metrics.registry.get_sample_value
    assert value("batchproxy_requests_total", {"transport": "grpc", "method": "Predict",
                                               "model": "m", "code": "OK"}) == 3
    assert value("batchproxy_request_duration_seconds_count",
                 {"transport": "grpc", "method": "Predict"}) == 3
    assert value("batchproxy_request_duration_seconds_bucket",
                 {"transport": "grpc", "method": "Predict", "le": "0.001"}) == 0
    assert value("batchproxy_request_duration_seconds_bucket",
                 {"transport": "grpc", "method": "Predict", "le": "0.0025"}) == 3
    assert value("batchproxy_batches_total", {"replica": "r:1"}) == 1
    assert value("batchproxy_batch_rows_sum") == 5
    assert value("batchproxy_batch_requests_count") == 1
    assert value("batchproxy_priority_requests_total",
                 {"priority": "critical", "code": "OK"}) == 1
    assert value("batchproxy_queue_wait_seconds_count") == 1
    assert b"batchproxy_batch_rows_count 1.0" in metrics.exposition()


def test_a_dropped_replica_keeps_no_tally():
    metrics = ProxyMetrics()
    metrics.sample_replicas({"r:1": (0, True)})
    metrics.observe_batch("r:1", 2, 1)
    metrics.sample_replicas({})
    metrics.observe_batch("r:1", 2, 1)  # a batch answered after the drop: a fresh series
    assert metrics.registry.get_sample_value("batchproxy_batches_total",
                                             {"replica": "r:1"}) == 1
