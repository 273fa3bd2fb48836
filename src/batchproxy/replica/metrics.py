"""The replica's Prometheus series, in a registry of its own so that a replica running inside
another process (tests) never mixes its series with the proxy's."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What the proxy is judged by: how many rows each Predict brings to the "GPU".
        self.batch_rows = Histogram(
            "batchproxy_replica_batch_rows",
            "Rows (dimension 0) of each Predict call the replica's model ran.",
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "batchproxy_replica_requests",
            "RPCs answered by the reference replica, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        # Predicts inside the model (running or queued on the cost model's lock): shows
        # how the proxy spreads batches over replicas.
        self.inflight = Gauge(
            "batchproxy_replica_inflight_predicts",
            "Predict calls currently running or waiting for the model.",
            registry=self.registry,
        )
        # The most Predicts that were inside the model at once since the replica started:
        # what shows whether the proxy (all its workers together) kept to
        # --max_inflight_per_replica, which a sampled gauge of the current count can miss.
        self.peak_inflight = Gauge(
            "batchproxy_replica_peak_inflight_predicts",
            "Most Predict calls running or waiting for the model at once since start.",
            registry=self.registry,
        )
        self._inside = 0
        self._peak = 0

    def predict_started(self) -> None:
        self._inside += 1
        self.inflight.inc()
        if self._inside > self._peak:
            self._peak = self._inside
            self.peak_inflight.set(self._peak)

    def predict_ended(self) -> None:
        self._inside -= 1
        self.inflight.dec()

    def count(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method, code.name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
