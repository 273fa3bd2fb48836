"""Warm-up with real processes: reference replicas whose first call at each batch size is
slow (as graph tracing is), a proxy under load, and a second replica that joins. With
warm-up no caller's call takes as long as that first-call delay; without it, some does.

Bounds are generous for a busy machine: the only latency compared is the configured
first-call delay (2.5 s), which a plain call here (2 ms of cost) never comes near.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_client import float_tensor
from model_dirs import add_version, write_warmup_file
from procs import HOST, Process, free_port, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.protos import predict_pb2, services_pb2_grpc

NAME = "traced"
FIRST_CALL_MS = 2500
MAX_BATCH = 8
CLIENTS = 6


def slow_first_calls(tmp_path: Path) -> Path:
    base = tmp_path / NAME
    add_version(base, 1, model="identity", batch_cost_ms=2,
                first_call_at_new_batch_size_ms=FIRST_CALL_MS)
    return base


def replica_on(base: Path, port: int | None = None) -> Process:
    return start_replica("identity", port=port, model_name=NAME, model_base_path=base,
                         file_system_poll_wait_seconds=0)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of series `name` whose labels include `labels`, from a Prometheus page."""
    text = requests.get(f"{url}/monitoring/prometheus/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


class Load:
    """Closed-loop callers (1 to 3 rows a call) recording (start, latency) of every call,
    bounded in time by `stop`, in count by `max_calls`."""

    def __init__(self, address: str, max_calls: int = 20000) -> None:
        self.address = address
        self.max_calls = max_calls
        self.calls: list[tuple[float, float]] = []
        self.versions: list[int] = []  # the version that answered each call
        self.errors: list[str] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(CLIENTS)]

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        channel = grpc.insecure_channel(self.address)
        stub = services_pb2_grpc.PredictionServiceStub(channel)
        try:
            while not self.done.is_set() and len(self.calls) < self.max_calls:
                request = predict_pb2.PredictRequest()
                request.model_spec.name = NAME
                rows = int(rng.integers(1, 4))
                request.inputs["x"].CopyFrom(float_tensor(np.ones((rows, 4), np.float32)))
                start = time.perf_counter()
                try:
                    response = stub.Predict(request, timeout=30)
                except grpc.RpcError as err:
                    self.errors.append(f"{err.code().name}: {err.details()}")
                    continue
                self.calls.append((start, time.perf_counter() - start))
                self.versions.append(response.model_spec.version.value)
        finally:
            channel.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(60)

    def slowest_since(self, since: float) -> float:
        return max((latency for start, latency in list(self.calls) if start >= since),
                   default=0.0)


def wait_until(what, within_s: float, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return slow_first_calls(tmp_path)


def join_under_load(base: Path, **proxy_flags: object) -> tuple[Load, float, Process]:
    """One replica serving under load, then a second one joins (it was down, as a replica
    being replaced is); returns the load, when the second started, and the second."""
    first = replica_on(base)
    port = free_port()
    proxy = start_proxy([first, f"{HOST}:{port}"], health_check_model=NAME,
                        health_interval_ms=200, max_batch_size=MAX_BATCH,
                        hedge_budget_percent=0, **proxy_flags)
    second: Process | None = None
    try:
        with Load(proxy.address) as load:
            # The first replica is warm: the proxy warmed it, or the load has met every
            # batch size on it by now.
            wait_until(lambda: len(load.calls) > 200, 60, "no load through the proxy")
            time.sleep(2 * FIRST_CALL_MS / 1e3)
            started = time.perf_counter()
            second = replica_on(base, port)
            wait_until(lambda: metric(proxy.rest_url, "batchproxy_replica_healthy",
                                      replica=f"{HOST}:{port}") == 1, 60,
                       "the second replica never joined")
            # It takes calls now; give it time to see every batch size it will see.
            time.sleep(3 * FIRST_CALL_MS / 1e3)
        assert not load.errors, load.errors[:5]
        return load, started, second
    finally:
        proxy.stop()
        first.stop()
        if second is not None:
            second.stop()


def fleet_log(proxy: Process) -> str:
    """The proxy's log lines on replica states and warm-ups: what a failure is read by."""
    return "\n".join(line for line in proxy.output().splitlines()
                     if " -> " in line or "warm" in line)


def second_replica_predicts(second: Process) -> float:
    return metric(second.rest_url, "batchproxy_replica_requests_total", method="Predict",
                  code="OK")


def test_with_warmup_no_caller_waits_for_a_first_call(base: Path) -> None:
    first = replica_on(base)
    port = free_port()
    proxy = start_proxy([first, f"{HOST}:{port}"], health_check_model=NAME,
                        health_interval_ms=200, max_batch_size=MAX_BATCH,
                        hedge_budget_percent=0)
    second: Process | None = None
    try:
        # The proxy warmed the first replica before any call: 1..MAX_BATCH once each.
        def warmed() -> float:
            return metric(proxy.rest_url, "batchproxy_warmup_calls_total", model=NAME,
                          outcome="ok")

        wait_until(lambda: warmed() == MAX_BATCH, 60,
                   "the first replica was not warmed")
        with Load(proxy.address) as load:
            wait_until(lambda: len(load.calls) > 200, 60, "no load through the proxy")
            started = time.perf_counter()
            second = replica_on(base, port)
            wait_until(lambda: metric(proxy.rest_url, "batchproxy_replica_healthy",
                                      replica=f"{HOST}:{port}") == 1, 60,
                       "the second replica never joined")
            wait_until(lambda: second_replica_predicts(second) > 2 * MAX_BATCH, 60,
                       "the second replica took no calls")
            time.sleep(1.0)
        assert not load.errors, load.errors[:5]
        assert warmed() == 2 * MAX_BATCH
        slowest = load.slowest_since(0)
        assert slowest < FIRST_CALL_MS / 1e3, (
            f"a call took {slowest:.3f}s with warm-up (first-call delay "
            f"{FIRST_CALL_MS} ms); calls after the join: "
            f"{sum(1 for s, _ in load.calls if s >= started)}; {fleet_log(proxy)}")
        # Warm-up calls are not callers' calls: the proxy counts them apart.
        wait_until(lambda: metric(proxy.rest_url, "batchproxy_requests_total",
                                  method="Predict", code="OK") == len(load.calls), 10,
                   "the proxy's call count differs from the callers' calls")
    finally:
        proxy.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_without_warmup_a_joining_replica_makes_callers_wait(base: Path) -> None:
    load, started, _ = join_under_load(base, no_warmup=True)
    slowest = load.slowest_since(started)
    assert slowest >= FIRST_CALL_MS / 1e3, (
        f"no call after the join took the first-call delay ({slowest:.3f}s)")


def test_a_new_version_is_warmed_before_latest_calls_reach_it(base: Path) -> None:
    replica = start_replica("identity", model_name=NAME, model_base_path=base,
                            model_version_policy="all", file_system_poll_wait_seconds=0.2)
    proxy = start_proxy([replica], health_check_model=NAME, health_interval_ms=200,
                        max_batch_size=MAX_BATCH, hedge_budget_percent=0)

    def warmed() -> float:
        return metric(proxy.rest_url, "batchproxy_warmup_calls_total", model=NAME,
                      outcome="ok")

    try:
        # Calls sent before version 1 is warmed would wait for it in the queue.
        wait_until(lambda: warmed() == MAX_BATCH, 60, "version 1 was not warmed")
        with Load(proxy.address) as load:
            wait_until(lambda: len(load.calls) > 200, 60, "no load through the proxy")
            # Version 2 appears: slow at every first batch size, as a new graph is.
            add_version(base, 2, model="identity", batch_cost_ms=2,
                        first_call_at_new_batch_size_ms=FIRST_CALL_MS)
            wait_until(lambda: load.versions.count(2) > 300, 60,
                       "latest calls never moved to version 2")
        assert not load.errors, load.errors[:5]
        slowest = load.slowest_since(0)
        assert slowest < FIRST_CALL_MS / 1e3, (
            f"a call took {slowest:.3f}s with warm-up (first-call delay {FIRST_CALL_MS} ms); "
            f"{fleet_log(proxy)}")
        assert warmed() == 2 * MAX_BATCH  # version 1 at start, then version 2
    finally:
        proxy.stop()
        replica.stop()


def test_warmup_from_tfs_warmup_records(base: Path, tmp_path: Path) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.inputs["x"].CopyFrom(float_tensor(np.full((2, 4), 3.0, np.float32)))
    records = tmp_path / "tf_serving_warmup_requests"
    write_warmup_file(records, [request.SerializeToString()])
    replica = replica_on(base)
    proxy = start_proxy([replica], health_check_model=NAME, health_interval_ms=200,
                        max_batch_size=4, warmup_requests_file=records)
    try:
        wait_until(lambda: metric(proxy.rest_url, "batchproxy_warmup_calls_total", model=NAME,
                                  outcome="ok") == 4, 60, "no warm-up from the records")
        # One batch of each size 1..4, cut from the record's two rows.
        assert metric(replica.rest_url, "batchproxy_replica_batch_rows_count") == 4
        assert metric(replica.rest_url, "batchproxy_replica_batch_rows_sum") == 10
        channel = grpc.insecure_channel(proxy.address)
        start = time.perf_counter()
        services_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert time.perf_counter() - start < FIRST_CALL_MS / 1e3
        channel.close()
    finally:
        proxy.stop()
        replica.stop()


def test_an_unreadable_warmup_file_stops_start_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    from procs import child_env

    bad = tmp_path / "w"
    bad.write_bytes(b"\x10" + bytes(3))  # a TFRecord cut short
    result = subprocess.run(
        [sys.executable, "-m", "batchproxy", "serve", "--replica", "127.0.0.1:1",
         "--warmup_requests_file", str(bad)],
        capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode == 1
    assert "batchproxy serve: TFRecord cut short at byte 0" in result.stderr


def test_with_workers_one_of_them_warms_each_replica(base: Path) -> None:
    # Every worker health-checks the replica; only one sends the warm-up, the other waits
    # for it, so the replica runs each batch size once (its slow first calls once).
    replica = replica_on(base)
    proxy = start_proxy([replica], health_check_model=NAME, health_interval_ms=200,
                        max_batch_size=MAX_BATCH, workers=2)
    try:
        wait_until(lambda: fleet_log(proxy).count("joining -> healthy") >= 2, 90,
                   "the replica did not become healthy in both workers")
        log = fleet_log(proxy)
        assert "warmed by another worker" in log, log
        assert metric(replica.rest_url, "batchproxy_replica_batch_rows_count") == MAX_BATCH
        assert metric(replica.rest_url, "batchproxy_replica_batch_rows_sum") == \
            MAX_BATCH * (MAX_BATCH + 1) / 2
        assert metric(proxy.rest_url, "batchproxy_warmup_calls_total", model=NAME,
                      outcome="ok") == MAX_BATCH
    finally:
        proxy.stop()
        replica.stop()
