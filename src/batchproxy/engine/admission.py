"""Admission: what the engine refuses at once rather than hold. Queued rows and bytes are
bounded, unbatched (forwarded) calls in flight are bounded, and a deadline the queue ahead
cannot meet is refused while the caller can still go elsewhere. Sheddable calls meet a
lower bound on queued rows (engine/priorities.py). Every refusal is UNAVAILABLE, as TFS
answers a full batch queue."""

from __future__ import annotations

import grpc

from batchproxy.config import BatchingConfig
from batchproxy.engine.policy import FlushPolicy
from batchproxy.engine.priorities import SHEDDABLE_DEADLINE_SHARE, SHEDDABLE_QUEUE_SHARE
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.metrics import ProxyMetrics


class Admission:
    def __init__(self, config: BatchingConfig, metrics: ProxyMetrics,
                 pool: ReplicaPool, policy: FlushPolicy | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.queued_rows = 0
        self.queued_bytes = 0
        self.sheddable_rows = 0  # the part of queued_rows that sheddable calls hold
        self.forwarded = 0  # unbatched calls in flight
        self.service_time_s: float | None = None  # mean replica time per batch
        self.pool = pool  # its replica slots serve the batches ahead
        self.policy = policy  # how many of those slots it fills at once

    def note_service_time(self, seconds: float) -> None:
        # An exponentially weighted mean: recent batches matter most (replicas slow down).
        if self.service_time_s is None:
            self.service_time_s = seconds
        else:
            self.service_time_s += 0.1 * (seconds - self.service_time_s)

    def expected_wait_s(self, rows: int, sheddable: bool = False,
                        batch_rows: int | None = None, model: str | None = None) -> float:
        """A rough time to answer `rows` more rows: the full batches ahead of them, served by
        all the replica slots in parallel, then their own batch. 0 until a batch was timed,
        and 0 with no full batch ahead: a call that would go out next is never refused on a
        guess (its replica decides). Sheddable rows are not ahead of a critical call: it is
        taken before them. `batch_rows`: the model's max_batch_size (None: the flag's).
        `model`: the slots are counted as the policy fills them for it (None: all)."""
        if self.service_time_s is None:
            return 0.0
        ahead = self.queued_rows if sheddable else self.queued_rows - self.sheddable_rows
        batches_ahead = (ahead + rows) // (batch_rows or self.config.max_batch_size)
        if batches_ahead == 0:
            return 0.0
        return (batches_ahead / self._slots(model) + 1) * self.service_time_s

    def _slots(self, model: str | None) -> int:
        """Batches the fleet serves at once. A policy that sends a batch only when a replica
        can start it keeps fewer in flight than the slots, each timed without a wait at the
        replica: counting every slot would halve the estimate on a one-batch replica."""
        pool = self.pool
        if model is None or self.policy is None or not pool.replicas:
            return pool.max_inflight * max(len(pool.replicas), 1)
        return max(sum(self.policy.parallel_batches(replica, model, pool.max_inflight)
                       for replica in pool.replicas.values()), 1)

    def overflow(self, rows: int, nbytes: int) -> tuple[int, int]:
        """(rows, bytes) by which a call of `rows` rows and `nbytes` bytes would pass the
        queue bounds; (0, 0) when it fits."""
        config = self.config
        rows_over = max(0, self.queued_rows + rows - config.max_enqueued_rows)
        bytes_over = 0
        if self.queued_bytes:  # the first call always fits, however large
            bytes_over = max(0, self.queued_bytes + nbytes - config.max_enqueued_bytes)
        return rows_over, bytes_over

    def admit_rows(self, rows: int, nbytes: int, timeout: float | None,
                   sheddable: bool = False, slo_ms: float | None = None,
                   batch_rows: int | None = None, model: str | None = None) -> None:
        """Admit a call's rows or refuse it (UNAVAILABLE). `slo_ms`: the model's own latency
        objective (its per-model setting), in place of --latency_slo_ms; `batch_rows`, its
        own max_batch_size, which sets how many batches the rows ahead make; `model`, whose
        replicas serve them."""
        config = self.config
        shed_bound = int(SHEDDABLE_QUEUE_SHARE * config.max_enqueued_rows)
        if sheddable and self.queued_rows and self.queued_rows + rows > shed_bound:
            # Room above the lower bound is kept for critical calls.
            self.metrics.reject("shed")
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE,
                f"Sheddable call shed: the batch queue is past its share for sheddable "
                f"calls ({self.queued_rows} rows queued, limit {shed_bound})")
        if self.queued_rows + rows > config.max_enqueued_rows:
            self.metrics.reject("queue_full")
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE,
                f"The batch scheduling queue to which this task was submitted is full "
                f"({self.queued_rows} rows queued, limit {config.max_enqueued_rows})")
        # The first call always fits, however large: the bound is on what waits behind it.
        if self.queued_bytes and self.queued_bytes + nbytes > config.max_enqueued_bytes:
            self.metrics.reject("queue_full")
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE,
                f"The batch scheduling queue to which this task was submitted is full "
                f"({self.queued_bytes} bytes queued, limit {config.max_enqueued_bytes})")
        slo = (config.latency_slo_ms if slo_ms is None else slo_ms) / 1000
        budget, what = timeout, "deadline"
        if slo and (budget is None or slo < budget):
            # The objective binds before the caller's deadline: the call still runs to its
            # own deadline once admitted; only its admission is judged by the objective.
            budget, what = slo, "latency objective"
        if budget is not None:
            wait = self.expected_wait_s(rows, sheddable, batch_rows, model)
            # 0.8: a margin for what the estimate leaves out (the way back, jitter). A
            # sheddable call gets less: critical calls arriving later still go first.
            share = SHEDDABLE_DEADLINE_SHARE if sheddable else 0.8
            if wait > 0 and wait > share * budget:
                self.metrics.reject("deadline_unreachable")
                raise ProxyError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"The batch queue is too long for this call's {what} (expected wait "
                    f"{wait * 1000:.0f} ms, {what} {budget * 1000:.0f} ms)")

    def admit_forwarded(self) -> None:
        if self.forwarded >= self.config.max_forwarded_calls:
            self.metrics.reject("queue_full")
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE,
                f"Too many unbatched calls in flight (limit {self.config.max_forwarded_calls})")
