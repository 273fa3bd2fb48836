"""Hedging for gray failures: a batch that has run well past what its replica is expected to
take (a hung replica, a degraded one) is sent again to another replica with a free slot. The
first successful answer is delivered; the other call is cancelled and its slot released, so
each caller gets exactly one answer.

A replica that answers errors is handled by retries (retry.py); hedging is for the replica
that does not answer at all, or far too late, long before the callers' deadlines would end
the wait. grpcio does not hedge, so it is done here, bounded by a budget in the manner of
Envoy's retry budget: hedges are at most `percent` % of the batches sent, plus a small floor
so that one hung replica in a quiet fleet is still hedged."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass

import grpc

from batchproxy.engine.admission import Admission
from batchproxy.engine.queues import Batch
from batchproxy.errors import ProxyError
from batchproxy.fleet.costs import WARM, CostModel
from batchproxy.fleet.slots import Endpoint, ReplicaPool, is_replica_failure
from batchproxy.metrics import ProxyMetrics

# A batch is overdue after max(FACTOR x its expected time, expected + MIN_EXTRA_S): well past
# the jitter of a healthy replica (and an event loop's hiccups), long before a deadline.
FACTOR = 3.0
MIN_EXTRA_S = 0.025
# The budget's floor: hedges allowed per second whatever the traffic, and how many may be
# saved up. A hung replica holds up to --max_inflight_per_replica batches at once; a burst
# of a few covers them.
FLOOR_PER_S = 1.0
BURST = 3.0


class HedgeBudget:
    """A token bucket: each batch sent adds `percent` / 100 of a hedge, time adds
    `floor_per_s` per second, up to `burst` saved; a hedge spends one. Over any span of T
    seconds with N batches sent, hedges <= burst + N x percent / 100 + T x floor_per_s."""

    def __init__(self, percent: float, floor_per_s: float = FLOOR_PER_S,
                 burst: float = BURST) -> None:
        if percent < 0:
            raise ValueError("the hedge budget must not be negative")
        self.percent = percent
        self.floor_per_s = floor_per_s
        self.burst = burst
        self.tokens = burst
        self._refilled_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.percent > 0

    def note_sent(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.percent / 100)

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None:
            elapsed = max(0.0, now - self._refilled_at)
            self.tokens = min(self.burst, self.tokens + elapsed * self.floor_per_s)
        self._refilled_at = now

    def available(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def spend(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


def expected_cost(pool: ReplicaPool, replica: Endpoint, model: str) -> CostModel | None:
    """The cost `replica` is expected to have for `model`: its own once it has seen enough
    batches, else the slowest warm one of its peers (a replica that hangs before it learned
    anything is still caught, and no healthy one is judged by a faster peer's time); None
    while no replica knows the model yet."""
    own = replica.costs.get(model)
    if own is not None and own.batches >= WARM:
        return own
    peers = [cost for other in pool.replicas.values()
             if (cost := other.costs.get(model)) is not None and cost.batches >= WARM]
    if not peers:
        return None
    return max(peers, key=lambda cost: cost.predict(1))


def overdue_after(cost: CostModel, rows: int, beside: int) -> float:
    """Seconds after which a batch of `rows` rows, sent beside `beside` others, is overdue.
    Batches beyond the replica's concurrency wait their turn there, one wave at a time."""
    expected = cost.predict(rows) * (beside // max(cost.concurrency, 1) + 1)
    return max(FACTOR * expected, expected + MIN_EXTRA_S)


@dataclass(frozen=True)
class HedgeWin:
    """The hedge answered first: `response` answers `batch` (the callers still waiting when
    it was sent), from the replica at `address`."""

    response: bytes
    batch: Batch
    address: str


def _answer_of(task: asyncio.Task[bytes]) -> ProxyError | None:
    """The error a finished call raised, None when it answered."""
    error = task.exception()
    if error is None:
        return None
    if isinstance(error, ProxyError):
        return error
    raise error


def _replica_fault(error: ProxyError) -> bool:
    """A failure that says nothing of the batch's content: the other call may still answer."""
    return is_replica_failure(error) or error.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def _settle(task: asyncio.Task[bytes] | None) -> None:
    """Cancel a call that lost the race (the gRPC call is cancelled with its task) and wait
    until it is gone, so its slot is released only once nothing uses it."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: a lost call's error is not "never retrieved"
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _wake(waiter: asyncio.Future[None], *_: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _done_within(task: asyncio.Task[bytes], delay: float) -> bool:
    """Whether `task` finishes within `delay` seconds (it keeps running either way). One
    future, one timer and one callback: asyncio.wait's sets and waiter, per batch, were
    most of what watching for a hedge cost."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(delay, _wake, waiter)
    task.add_done_callback(lambda _: _wake(waiter))
    try:
        await waiter
    finally:
        timer.cancel()
    return task.done()


class Hedger:
    def __init__(self, pool: ReplicaPool, admission: Admission, metrics: ProxyMetrics,
                 percent: float) -> None:
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        self.budget = HedgeBudget(percent)

    def predict(self, replica: Endpoint, batch: Batch, patience: float,
                beside: int) -> Awaitable[bytes | HedgeWin]:
        """Send `batch` to `replica` (its slot held by the caller, which also releases it)
        and, once it is overdue, to a second replica. Returns the first call's answer, or
        the hedge's as a HedgeWin; raises the first call's error when nothing answered.

        A plain function that returns what to await: a batch that will not be hedged awaits
        the replica call itself, with no coroutine of the hedger's per batch."""
        pool = self.pool
        budget = self.budget
        budget.note_sent()
        cost = expected_cost(pool, replica, batch.model) if budget.enabled else None
        delay = None if cost is None else overdue_after(cost, batch.sent_rows, beside)
        if delay is None or delay >= patience:
            return pool.predict(replica, batch.request, patience)
        return self._hedged(replica, batch, patience, delay)

    async def _hedged(self, replica: Endpoint, batch: Batch, patience: float,
                      delay: float) -> bytes | HedgeWin:
        pool = self.pool
        loop = asyncio.get_running_loop()
        first = loop.create_task(pool.predict(replica, batch.request, patience))
        try:
            if await _done_within(first, delay):
                return first.result()
            return await self._hedge(first, replica, batch)
        finally:
            await _settle(first)

    async def _hedge(self, first: asyncio.Task[bytes], replica: Endpoint,
                     batch: Batch) -> bytes | HedgeWin:
        """`first` is overdue: race it against the same batch on another replica."""
        pool = self.pool
        loop = asyncio.get_running_loop()
        if not self.budget.available(loop.time()):
            self.metrics.hedge("budget_exceeded")
            return await first
        spare = await self._spare_slot(first, replica, batch.model, batch.version)
        if spare is None:
            if not first.done():
                self.metrics.hedge("no_replica")
            return await first
        rest = batch.without_answered()
        # Taken from the time the second call starts, not the first: no caller's deadline
        # is stretched, none is cut.
        patience = rest.patience(loop.time(), pool.default_timeout_s)
        second: asyncio.Task[bytes] | None = None
        try:
            self.budget.spend(loop.time())
            self.metrics.observe_batch(spare.address, rest.rows, len(rest.pieces),
                                       rest.padding)
            beside = pool.note_sent(spare, rest.model, rest.sent_rows)
            sent_at = loop.time()
            second = loop.create_task(pool.predict(spare, rest.request, patience))
            await asyncio.wait((first, second), return_when=asyncio.FIRST_COMPLETED)
            first_error = _answer_of(first) if first.done() else None
            if first.done() and (first_error is None or not _replica_fault(first_error)):
                # The first call answered (or refused the content): the hedge is moot.
                self.metrics.hedge("lost")
                await _settle(second)
                pool.note_answered(spare, rest.model, rest.sent_rows, None, beside)
                return await first
            await asyncio.wait((second,))
            second_error = _answer_of(second)
            if second_error is not None:
                self.metrics.hedge("failed")
                pool.note_answered(spare, rest.model, rest.sent_rows, None, beside)
                return await first
            took = loop.time() - sent_at
            self.metrics.hedge("won")
            self.admission.note_service_time(took)
            pool.note_answered(spare, rest.model, rest.sent_rows, took, beside)
            if first_error is None:
                # Passive health: overdue by far while a peer answered counts against the
                # replica as a timeout does; a hung one is ejected after a few such losses
                # instead of taking, one after another, every batch its freed slot invites.
                pool.record_failure(replica, ProxyError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "overdue: another replica answered its batch first"))
            return HedgeWin(second.result(), rest, spare.address)
        finally:
            await _settle(second)
            pool.release(spare)

    async def _spare_slot(self, first: asyncio.Task[bytes], replica: Endpoint,
                          model: str, version: int | None = None) -> Endpoint | None:
        """A slot on a replica other than `replica` that serves `model`: at once, or when
        one frees before `first` answers. None when `first` answered first, or when no other
        replica could serve the model."""
        pool = self.pool
        while not first.done():
            spare = pool.try_acquire(model, exclude=replica, version=version)
            if spare is not None:
                return spare
            if not pool.can_serve(model, exclude=replica, version=version):
                return None
            await asyncio.wait((first, pool.capacity_changed()),
                               return_when=asyncio.FIRST_COMPLETED)
        return None
