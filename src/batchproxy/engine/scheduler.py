"""The scheduler: per-key queues, admission, and the loop that hands batches to the
dispatcher when the flush policy says so.

Calls are queued per batch key (model, version or label, signature, input names, dtypes,
inner dimensions, output_filter). Rows count, not calls: a call with more rows than the room
left is cut into pieces that travel in consecutive batches; its answers are joined back in
order. When rows leave is the policy's decision (engine/policy.py), asked again after every
batch taken, so rows left over after a full batch keep their own due time. Which rows a
batch takes, and which calls are shed first, follows their priority (engine/priorities.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence

import grpc

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import priorities
from batchproxy.engine.admission import Admission
from batchproxy.engine.model_batching import BatchingTable, ModelBatching
from batchproxy.engine.policy import FlushPolicy, Hold
from batchproxy.engine.queues import Batch, Entry, KeyQueue, Piece, call_bytes
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import Endpoint, ReplicaPool, Route
from batchproxy.fleet.versions import VersionRouter
from batchproxy.metrics import ProxyMetrics
from batchproxy.priority import Priority

Dispatch = Callable[[Endpoint, Batch], None]
# Marks the key of a queue whose calls wait under settings a reload replaced.
RETIRED = "retired"


def no_replica(model: str) -> ProxyError:
    return ProxyError(grpc.StatusCode.UNAVAILABLE, f"no healthy replica serves model '{model}'")


def row_bytes(entry: Entry, rows: int) -> int:
    """The bytes of an entry's first `rows` rows; exact in sum, so the byte count of the
    queue returns to 0 whatever the pieces were."""
    return entry.nbytes * rows // entry.rows


class Scheduler:
    def __init__(self, config: BatchingConfig, pool: ReplicaPool, policy: FlushPolicy,
                 admission: Admission, dispatch: Dispatch, metrics: ProxyMetrics,
                 versions: VersionRouter | None = None) -> None:
        self.config = config
        self.versions = versions
        self.pool = pool
        self.policy = policy
        self.admission = admission
        self.dispatch = dispatch
        self.metrics = metrics
        self.queues: dict[tuple, KeyQueue] = {}
        # Each model's batching (the flags, or its own table in the proxy config file).
        self.batching = BatchingTable(config, versions)
        self._retired = itertools.count()
        self._closed: ProxyError | None = None  # set by close(): refuse every new call
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._woken = False
        # Futures resolved after the next pass of the loop or the next call taken out of
        # the queues: what a drain waits on instead of polling.
        self._progress: list[asyncio.Future[None]] = []
        pool.capacity_listeners.append(self.wake)

    # -- submitting ------------------------------------------------------------------------

    def batching_of(self, model: str) -> ModelBatching:
        return self.batching.of(model)

    def batch_sizes(self, model: str) -> Sequence[int]:
        """The batch sizes the proxy may send for `model` (what warm-up sends)."""
        return self.batching.of(model).batch_sizes

    async def submit(self, call: codec.PredictCall, timeout: float | None = None,
                     priority: Priority | None = None) -> bytes:
        """Queue a batchable call (call.rows >= 1) and wait for its own answer. `priority`:
        the call's own; None, the model's default (critical unless its settings say).
        Every outcome is counted under the call's priority, here rather than in a wrapper
        coroutine."""
        code = "OK"
        model = call.model_name
        batching = self.batching.of(model)
        if priority is None:
            priority = batching.priority
        try:
            if self._closed is not None:
                raise self._closed
            rows = call.rows
            self.pool.note_model(model)
            if self.pool.route(model) is Route.NOWHERE:
                self.metrics.reject("no_replica")
                raise no_replica(model)
            version, latest = self._target(call)
            nbytes = call_bytes(call)
            admission = self.admission
            sheddable = priority is Priority.SHEDDABLE
            if not sheddable:
                self._evict_for(rows, nbytes)
            admission.admit_rows(rows, nbytes, timeout, sheddable, batching.slo_ms,
                                 batching.full, model)
            loop = asyncio.get_running_loop()
            now = loop.time()
            lengths = batching.lengths
            # The resolved version is part of the key: no batch mixes versions.
            key = call.key if lengths is None else lengths.key(call)
            if version is not None:
                key = (*key, version)
            queue = self.queues.get(key)
            if queue is None or queue.batching is not batching:
                if queue is not None:
                    self._retire(key, queue)
                queue = self.queues[key] = KeyQueue(key, version, latest, batching)
            deadline = None if timeout is None else now + timeout
            entry = Entry(call, loop.create_future(), deadline, now, queue, nbytes, sheddable,
                          priorities.promote_at(now, timeout) if sheddable else now)
            rows_before = queue.rows
            queue.add(entry)
            admission.queued_rows += rows
            admission.queued_bytes += nbytes
            if sheddable:
                admission.sheddable_rows += rows
            if deadline is not None:
                entry.timer = loop.call_at(deadline, self._expire, entry)
            if self.policy.wake_on_submit(queue, rows_before):
                self.wake()
            try:
                return await entry.future
            except asyncio.CancelledError:
                self.abandon(entry)
                raise
            finally:
                if entry.timer is not None:
                    entry.timer.cancel()
        except ProxyError as err:
            code = err.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.observe_priority(priority.value, code)

    def _retire(self, key: tuple, queue: KeyQueue) -> None:
        """A reload changed the batching of the calls in `queue`: they leave under the
        settings they were queued under, from a key no new call has; new calls start a
        queue of their own, so no batch mixes the two."""
        del self.queues[key]
        self.queues[(*key, RETIRED, next(self._retired))] = queue

    def _target(self, call: codec.PredictCall) -> tuple[int | None, bool]:
        """The version the call is sent for, and whether the proxy chose it (a `latest`
        call): its own, its label's (refused when the label is unknown), or the latest
        policy's; None while the proxy knows no versions of the model (sent as named).
        A version no replica holds or is loading is refused at once (VersionRouter)."""
        router = self.versions
        model = call.model_name
        if call.version is not None:
            if router is not None:
                router.refuse_absent(model, call.version, named=True)
            return call.version, False
        if router is None:
            return None, False
        if call.version_label is not None:
            version = router.resolve_label(model, call.version_label)
            if version is not None:
                router.refuse_absent(model, version, False, call.version_label)
            return version, False
        version = router.resolve_latest(model)
        if version is not None and router.settings_of(model).latest.kind == "pinned":
            router.refuse_absent(model, version, named=False)
        return version, version is not None

    def _evict_for(self, rows: int, nbytes: int) -> None:
        """A critical call that finds the queues full makes room by failing queued
        sheddable calls, newest first, when that is enough (else it is refused itself)."""
        if not self.admission.sheddable_rows:
            return
        rows_over, bytes_over = self.admission.overflow(rows, nbytes)
        if not rows_over and not bytes_over:
            return
        for victim in priorities.victims(self.queues.values(), rows_over, bytes_over):
            self.metrics.reject("shed")
            victim.fail(ProxyError(grpc.StatusCode.UNAVAILABLE,
                                   "Sheddable call shed for a critical call: the batch "
                                   "queue is full"))
            self.abandon(victim)

    def _expire(self, entry: Entry) -> None:
        """A caller's own deadline passed: answer it, wherever its rows are. A batch that
        holds some of them goes on for its other callers."""
        if entry.future.done():
            return
        where = "in the queue" if entry.next_row < entry.rows else "at the replica"
        self.metrics.reject("deadline")
        entry.fail(ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"Deadline exceeded while waiting {where}"))
        self.abandon(entry)

    def _refuse_unreachable(self, entry: Entry, expected_s: float) -> None:
        self.metrics.reject("deadline_unreachable")
        entry.fail(ProxyError(
            grpc.StatusCode.UNAVAILABLE,
            f"The call cannot be answered within its deadline: the replica needs about "
            f"{expected_s * 1000:.0f} ms for its batch"))
        self.abandon(entry)

    def abandon(self, entry: Entry) -> None:
        """Take an answered-early call's untaken rows out of the counts; they are never sent."""
        if entry.dead:
            return
        entry.dead = True
        self._notify_progress()
        untaken = entry.rows - entry.next_row
        self.admission.queued_bytes -= entry.nbytes - row_bytes(entry, entry.next_row)
        entry.next_row = entry.rows
        entry.queue.rows -= untaken
        self.admission.queued_rows -= untaken
        if entry.sheddable:
            entry.queue.sheddable_rows -= untaken
            self.admission.sheddable_rows -= untaken

    def close(self, error: ProxyError) -> None:
        """Fail every queued call with `error`, and every call submitted from now on: with
        the loop stopped, nothing would ever take it out of a queue."""
        self._closed = error
        for queue in self.queues.values():
            self._fail_queue(queue, error)
        self.queues.clear()

    def reopen(self) -> None:
        self._closed = None

    def _fail_queue(self, queue: KeyQueue, error: ProxyError) -> None:
        for entry in queue.all_entries():
            entry.fail(error)
            self.abandon(entry)
        queue.entries.clear()
        queue.sheddable.clear()

    # -- the loop --------------------------------------------------------------------------

    def wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def progress(self) -> asyncio.Future[None]:
        """A future resolved once the loop has looked at the queues again, or a queued call
        was answered early: the moment the queued row count may have moved."""
        future = asyncio.get_running_loop().create_future()
        self._progress.append(future)
        return future

    def _notify_progress(self) -> None:
        waiters, self._progress = self._progress, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._woken = False
                next_due = self.dispatch_due(loop.time())
                if self._progress:
                    self._notify_progress()
                if not self._woken:  # a dispatch may itself have freed or changed something
                    await self._sleep_until(loop, next_due)
        finally:
            self._set_timer(loop, None)

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        waiter = self._waiter = loop.create_future()
        self._set_timer(loop, when)
        try:
            await waiter
        finally:
            self._waiter = None

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        """The loop's one timer wakes it at `when` (None: no timer). A timer already set for
        that time is kept: most passes (a submit, a slot freed) end with the same due time
        as the pass before, and a timer per pass cost a handle armed and cancelled."""
        timer = self._timer
        if timer is not None:
            if when == self._timer_at:
                return
            timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = loop.call_at(when, self._timer_fired)
            self._timer_at = when

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    def dispatch_due(self, now: float) -> float | None:
        """Hand every batch the policy releases now to the dispatcher, oldest queue first.
        Returns the earliest time the policy asked to look again; queues waiting for a slot
        are looked at again when the fleet reports capacity."""
        self.pool.turn.looked(now)
        live: list[tuple[float, KeyQueue]] = []
        for key, queue in list(self.queues.items()):
            head = queue.head() if queue.rows > 0 else None
            if head is None:
                del self.queues[key]
                continue
            live.append((head.enqueued_at, queue))
        live.sort(key=lambda item: item[0])
        next_due: float | None = None
        for _, queue in live:
            while queue.rows > 0:
                decision = self.policy.decide(queue, now)
                if isinstance(decision, Hold):
                    if next_due is None or decision.until < next_due:
                        next_due = decision.until
                    break
                if decision.replica is not None:
                    replica = self.pool.try_acquire_on(decision.replica, queue.model,
                                                       queue.version)
                else:
                    replica = self.pool.try_acquire(queue.model, idle_only=decision.idle_only,
                                                    version=queue.version)
                if replica is None:
                    if self.pool.route(queue.model, queue.version) is Route.NOWHERE:
                        self._fail_queue(queue, no_replica(queue.model))
                    break
                answer_by = self.policy.answer_by(
                    replica, queue.model, min(queue.rows, queue.full), now)
                batch = self.take_batch(queue, now, replica, answer_by)
                if batch is None:
                    self.pool.release(replica)
                    break
                batch.behind = decision.behind
                self.policy.on_dispatch(queue, replica, batch.rows, now)
                self.pool.note_planned(replica, queue.model, batch.sent_rows)
                self.dispatch(replica, batch)
        return next_due

    def take_batch(self, queue: KeyQueue, now: float,
                   replica: Endpoint | None = None,
                   answer_by: float | None = None) -> Batch | None:
        """Up to a full batch of rows: critical calls first, then sheddable ones into the
        room left (a promoted sheddable call by its arrival among the critical ones). With
        allowed batch sizes the padding policy may take fewer (batch down, by the cost of
        `replica`, the one the batch goes to) and the batch is padded up to an allowed
        size. A call whose deadline falls before `answer_by` (when its replica is expected
        to answer) is refused now instead: sent, it would only be late, and its rows would
        slow the batch for everyone else in it."""
        cost = replica.cost(queue.model) if replica is not None else None
        batching = queue.batching or self.batching.default
        size = room = batching.padding.room(queue.rows, cost)
        pieces: list[Piece] = []
        waited = self.metrics.queue_wait_tally.observe
        freed_bytes = 0
        sheddable_rows = 0
        while room:
            entry = queue.next_entry(now)
            if entry is None:
                break
            start = entry.next_row
            if start == 0 and answer_by is not None and entry.deadline is not None \
                    and entry.deadline < answer_by:
                self._refuse_unreachable(entry, answer_by - now)
                continue
            if start == 0:
                waited(now - entry.enqueued_at)
            take = min(room, entry.rows - start)
            pieces.append((entry, start, start + take))
            entry.next_row = start + take
            freed_bytes += row_bytes(entry, start + take) - row_bytes(entry, start)
            room -= take
            if entry.sheddable:
                sheddable_rows += take
            if entry.next_row == entry.rows:
                queue.pop(entry)
        if not pieces:
            return None
        rows = size - room
        queue.rows -= rows
        self.admission.queued_rows -= rows
        queue.sheddable_rows -= sheddable_rows
        self.admission.sheddable_rows -= sheddable_rows
        self.admission.queued_bytes -= freed_bytes
        return Batch.of(queue.model, pieces, queue.version, queue.latest,
                        batching.padding.sizes, batching.lengths)
