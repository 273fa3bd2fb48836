"""The proxy's Prometheus series, named by Prometheus conventions (prefix batchproxy_, base
units, _total counters).

Hot-path updates (every call's count and latency, every batch's size) are tallied in plain
Python numbers bound once per label set, and added to the prometheus-client series whenever
they are read (every collection of the registry, every exposition) and a few times a second:
prometheus-client takes a lock per observation, which was a few per cent of the proxy's CPU
per call. Gauges that describe state (queue depth, outstanding batches, replica health) are
sampled a few times a second instead of being written on every change. With several
workers, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before this
module is imported) makes one scrape cover all of them."""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from batchproxy.supervisor import cancel_and_wait

if TYPE_CHECKING:
    from batchproxy.supervisor import Supervisor

# Sub-millisecond to seconds: a batch timeout is often 1-5 ms, a deadline seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_LABEL_SETS = 1000
# Every reason a call is refused before a replica sees it; each is exported from the start,
# at 0, so a dashboard's rate() of a reason exists before the first refusal.
REJECT_REASONS = ("queue_full", "deadline_unreachable", "deadline", "no_replica", "invalid",
                  "too_large", "unauthenticated", "shed")
PRIORITIES = ("critical", "sheddable")
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# What became of each batch overdue on its replica (engine/hedging.py): won, the hedge
# answered first; lost, the first call did and the hedge was cancelled; failed, the hedge
# failed; budget_exceeded, the hedge budget had none left; no_replica, no other replica had
# a slot before the first call ended. Each exported from the start, at 0.
HEDGE_OUTCOMES = ("won", "lost", "failed", "budget_exceeded", "no_replica")
# Shadow copies (engine/shadow.py): compared, the answers were compared; skipped, no slot or
# the cap on shadow batches in flight; and the mismatches: shape (outputs or shapes differ),
# error (the shadow failed), dtype.
SHADOW_OUTCOMES = ("compared", "skipped", "shape", "error", "dtype")
# Max abs difference between a shadow's answer and the primary's.
DIFFERENCE_BUCKETS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Tally:
    """Increments of one counter child, kept as an int until the next flush. One thread only
    (the event loop's): `count += n` and the flush's swap are not atomic across threads."""

    __slots__ = ("child", "count")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.count = 0

    def inc(self, amount: int = 1) -> None:
        self.count += amount

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self.child.inc(count)


class HistogramTally:
    """Observations of one histogram child, kept as per-bucket counts and a sum until the
    next flush, which adds them to the child's own bucket and sum values as its observe()
    would have one by one. Same thread rule as Tally."""

    __slots__ = ("bounds", "child", "counts", "pending", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        # The child's upper bounds, +Inf last: an observation counts in the first bucket
        # whose bound is >= it, as Histogram.observe decides.
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.pending = False

    def observe(self, value: float) -> None:
        if value != value:  # NaN: observe() adds it to the sum and to no bucket
            self.total += value
            self.pending = True
            return
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.pending = True

    def flush(self) -> None:
        if not self.pending:
            return
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        self.pending = False
        child = self.child
        child._raise_if_not_observable()
        # prometheus-client's own storage of a histogram child: a value per bucket (counts
        # in that bucket alone) and one for the sum; tests/test_metrics.py checks that a
        # flush exposes exactly what observe() would.
        child._sum.inc(total)
        for bucket, count in zip(child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class _Flusher:
    """Registered first in a registry: every collection flushes the tallies before the
    series are read, so a scrape or get_sample_value sees every observation so far."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.flush = flush

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self.flush()
        return []


class ProxyMetrics:
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self._tallies: list[Tally | HistogramTally] = []
        registry.register(_Flusher(self.flush))  # before any series, so collected first
        self.requests = Counter(
            "batchproxy_requests", "Calls answered, by transport, method, model and status code",
            ["transport", "method", "model", "code"], registry=registry)
        self.request_duration = Histogram(
            "batchproxy_request_duration_seconds", "End-to-end latency of a call in the proxy",
            ["transport", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "batchproxy_queue_wait_seconds",
            "Time from a call's arrival in the batch queue to its batch being sent",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_rows = Histogram(
            "batchproxy_batch_rows", "Rows in each batch sent to a replica",
            buckets=SIZE_BUCKETS, registry=registry)
        self.batch_requests = Histogram(
            "batchproxy_batch_requests", "Calls (or pieces of calls) in each batch",
            buckets=SIZE_BUCKETS, registry=registry)
        self.padding_rows = Histogram(
            "batchproxy_batch_padding_rows", "Padding rows in each batch sent, by replica "
            "(allowed batch sizes: copies of a real row, cut from the answer)", ["replica"],
            buckets=(0, *SIZE_BUCKETS), registry=registry)
        self.batches = Counter(
            "batchproxy_batches", "Batches sent, by replica", ["replica"], registry=registry)
        self.retries = Counter(
            "batchproxy_retries", "Batches sent again to another replica after a failure",
            registry=registry)
        # Apart from calls and batches: warm-up Predicts go to a replica before it serves.
        self.warmup_calls = Counter(
            "batchproxy_warmup_calls", "Warm-up Predict calls sent to replicas (or new "
            "versions) before real calls, by model and outcome (ok, failed)",
            ["model", "outcome"], registry=registry)
        self.hedged = Counter(
            "batchproxy_hedged_batches", "Batches overdue on their replica, by what became of "
            "the hedge: won, lost, failed, budget_exceeded, no_replica", ["outcome"],
            registry=registry)
        self._hedge_children: dict[str, Counter] = {
            outcome: self.hedged.labels(outcome) for outcome in HEDGE_OUTCOMES}
        self.ejections = Counter(
            "batchproxy_replica_ejections", "Times a replica was ejected", ["replica"],
            registry=registry)
        self.rejected = Counter(
            "batchproxy_rejected_requests", "Calls refused before reaching a replica, by reason",
            ["reason"], registry=registry)
        # Batched calls only, so the two classes' shares of OK and UNAVAILABLE (shed or
        # refused) can be compared; batchproxy_requests has the rest.
        self.priority_requests = Counter(
            "batchproxy_priority_requests", "Batched Predict calls answered, by priority and "
            "status code", ["priority", "code"], registry=registry)
        self.queued_rows = Gauge(
            "batchproxy_queued_rows", "Rows waiting in batch queues",
            multiprocess_mode="livesum", registry=registry)
        self.outstanding = Gauge(
            "batchproxy_replica_outstanding_batches", "Batches in flight per replica",
            ["replica"], multiprocess_mode="livesum", registry=registry)
        self.replica_healthy = Gauge(
            "batchproxy_replica_healthy", "1 while a replica is healthy, else 0", ["replica"],
            multiprocess_mode="livemax", registry=registry)
        # The learned cost of each replica and model (fleet/costs.py).
        self.batch_cost = Gauge(
            "batchproxy_replica_batch_cost_seconds", "Learned batch latency: part=fixed is "
            "a, part=per_row is b in a + b * rows", ["replica", "model", "part"],
            multiprocess_mode="liveall", registry=registry)
        self.concurrency = Gauge(
            "batchproxy_replica_concurrency", "Batches a replica is learned to run at once "
            "without slowing down", ["replica", "model"], multiprocess_mode="liveall",
            registry=registry)
        self._cost_labels: set[tuple[str, str]] = set()
        self.turn = Gauge(
            "batchproxy_turn_seconds", "How long after a replica's answer the proxy's loop "
            "sends its next batch (each worker's own): the adaptive policy sends a batch "
            "that much before its replica frees", multiprocess_mode="livemax",
            registry=registry)
        self.model_versions = Gauge(
            "batchproxy_model_version_replicas", "Replicas listing each version of a model in "
            "each state (GetModelStatus)", ["model", "version", "state"],
            multiprocess_mode="livemax", registry=registry)
        self._version_labels: set[tuple[str, str, str]] = set()
        self.shadow_batches = Counter(
            "batchproxy_shadow_batches", "Shadow copies of batches by outcome: compared, "
            "skipped, or a mismatch (shape, dtype, error)", ["model", "outcome"],
            registry=registry)
        self.shadow_difference = Histogram(
            "batchproxy_shadow_max_abs_difference", "Largest absolute difference between a "
            "shadow version's answer and the primary's, per compared batch", ["model"],
            buckets=DIFFERENCE_BUCKETS, registry=registry)
        self.worker_calls = Gauge(
            "batchproxy_worker_calls", "Calls answered by each worker process (pid label "
            "with --workers)", multiprocess_mode="all", registry=registry)
        self.calls_handled = 0
        self._request_children: dict[tuple[str, str, str, str], Tally] = {}
        self._duration_children: dict[tuple[str, str], HistogramTally] = {}
        # Per replica: its batch count and its padding rows per batch.
        self._batch_children: dict[str, tuple[Tally, HistogramTally]] = {}
        # Observed on every call or batch: tallied (see the module's docstring).
        self.queue_wait_tally = self._histogram_tally(self.queue_wait)
        self._batch_rows = self._histogram_tally(self.batch_rows)
        self._batch_requests = self._histogram_tally(self.batch_requests)
        self._rejected_children: dict[str, Counter] = {
            reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        self._replicas: set[str] = set()  # addresses with per-replica series
        self._priority_children: dict[tuple[str, str], Tally] = {
            (priority, "OK"): self._tally(self.priority_requests.labels(priority, "OK"))
            for priority in PRIORITIES}

    # -- hot path: tallies bound once per label set -----------------------------------------

    def _tally(self, child: Counter) -> Tally:
        tally = Tally(child)
        self._tallies.append(tally)
        return tally

    def _histogram_tally(self, child: Histogram) -> HistogramTally:
        tally = HistogramTally(child)
        self._tallies.append(tally)
        return tally

    def flush(self) -> None:
        """Add every tallied observation to its prometheus-client series."""
        for tally in self._tallies:
            tally.flush()

    def observe_call(self, transport: str, method: str, model: str, code: str,
                     seconds: float) -> None:
        key = (transport, method, model, code)
        child = self._request_children.get(key)
        if child is None and len(self._request_children) >= MAX_LABEL_SETS:
            # Model names come from clients: past a bound, fold new ones together.
            key = (transport, method, "_other_", code)
            child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._tally(self.requests.labels(*key))
        child.count += 1
        self.calls_handled += 1
        duration = self._duration_children.get((transport, method))
        if duration is None:
            duration = self._duration_children[(transport, method)] = \
                self._histogram_tally(self.request_duration.labels(transport, method))
        duration.observe(seconds)

    def observe_batch(self, replica: str, rows: int, calls: int, padding: int = 0) -> None:
        children = self._batch_children.get(replica)
        if children is None:
            children = self._batch_children[replica] = (
                self._tally(self.batches.labels(replica)),
                self._histogram_tally(self.padding_rows.labels(replica)))
        children[0].count += 1
        children[1].observe(padding)
        self._batch_rows.observe(rows)
        self._batch_requests.observe(calls)

    def observe_priority(self, priority: str, code: str) -> None:
        key = (priority, code)
        child = self._priority_children.get(key)
        if child is None:
            child = self._priority_children[key] = self._tally(
                self.priority_requests.labels(*key))
        child.count += 1

    def warmup_call(self, model: str, outcome: str) -> None:
        self.warmup_calls.labels(model, outcome).inc()

    def hedge(self, outcome: str) -> None:
        self._hedge_children[outcome].inc()

    def reject(self, reason: str) -> None:
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self.rejected.labels(reason)
        child.inc()

    # -- sampled state -----------------------------------------------------------------------

    def sample_replicas(self, replicas: Mapping[str, tuple[int, bool]]) -> None:
        """Per-replica gauges from {address: (outstanding batches, healthy)}. A replica no
        longer in the pool loses its series, so a dropped one is not reported healthy
        forever and DNS churn does not pile up label sets."""
        # The gauge sampler's round, a few times a second: tallied counts reach the series
        # then too (with --workers, the shared files), even when nothing scrapes this worker.
        self.flush()
        for address, (outstanding, healthy) in replicas.items():
            self.outstanding.labels(address).set(outstanding)
            self.replica_healthy.labels(address).set(1 if healthy else 0)
        for address in self._replicas - replicas.keys():
            self._forget_replica(address)
        self._replicas = set(replicas)

    def sample_costs(self, costs: Mapping[tuple[str, str], tuple[float, float, int]]) -> None:
        """Cost gauges from {(replica, model): (a seconds, b seconds per row, concurrency)};
        pairs no longer known lose their series."""
        for (address, model), (fixed, per_row, concurrency) in costs.items():
            self.batch_cost.labels(address, model, "fixed").set(fixed)
            self.batch_cost.labels(address, model, "per_row").set(per_row)
            self.concurrency.labels(address, model).set(concurrency)
        for address, model in self._cost_labels - costs.keys():
            for part in ("fixed", "per_row"):
                self.batch_cost.remove(address, model, part)
            self.concurrency.remove(address, model)
        self._cost_labels = set(costs)

    def sample_versions(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """The version gauge from {(model, version, state): replicas}; a combination no
        replica lists any longer reads 0 (then goes), so a roll-back shows on the panel."""
        for key, value in counts.items():
            self.model_versions.labels(*key).set(value)
        for key in self._version_labels - counts.keys():
            self.model_versions.remove(*key)
        self._version_labels = set(counts)

    def shadow(self, model: str, outcome: str, difference: float | None = None) -> None:
        self.shadow_batches.labels(model, outcome).inc()
        if difference is not None:
            self.shadow_difference.labels(model).observe(difference)

    def _forget_replica(self, address: str) -> None:
        tallies = self._batch_children.pop(address, None)
        for tally in tallies or ():
            tally.flush()
            self._tallies.remove(tally)
        if multiprocess_dir():
            # With --workers the values live in files that no removal reaches: the best
            # they can say of a dropped replica is 0.
            self.outstanding.labels(address).set(0)
            self.replica_healthy.labels(address).set(0)
            return
        for metric in (self.outstanding, self.replica_healthy, self.batches, self.ejections,
                       self.padding_rows):
            metric.remove(address)

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        if multiprocess_dir():
            # The other workers flush theirs when they sample their gauges.
            self.flush()
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self.handle),
                web.get("/monitoring/prometheus/metrics", self.handle)]


class GaugeSampler:
    """Copies state gauges from live objects a few times a second (off the hot path)."""

    def __init__(self, sample: Callable[[], None], interval_s: float = 0.2) -> None:
        self.sample = sample
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Sample every interval: under `supervisor` when given (a sampling bug is then
        logged and the loop restarted), else as a task of our own."""
        if supervisor is not None:
            supervisor.spawn("gauge_sampler", self.run)
        else:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
