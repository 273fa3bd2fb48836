"""Queues, flush policy, deadlines and row splitting: how single calls become batches.

Calls are queued per batch key (model, version or label, signature, input names, dtypes,
inner dimensions, output_filter). A key's batch closes when it holds `max_batch_size` rows
or its oldest call has waited `batch_timeout_micros`. The closed batch then waits for a
replica slot, and only when one is free are its rows taken: so while every replica is busy
the batch keeps filling up to `max_batch_size`, and batches grow with load.

Rows count, not calls: a call with more rows than the room left is cut into pieces that
travel in consecutive batches; its answers are joined back in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

import grpc

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.errors import ProxyError
from batchproxy.metrics import ProxyMetrics
from batchproxy.fleet.slots import Replica, ReplicaPool, Route, is_replica_failure

log = logging.getLogger(__name__)


class _Entry:
    """One queued call and the progress of its rows through batches."""

    __slots__ = (
        "call",
        "dead",
        "deadline",
        "enqueued_at",
        "future",
        "next_row",
        "parts",
        "queue",
        "rows",
        "rows_answered",
        "timer",
    )

    def __init__(self, call: codec.PredictCall, future: asyncio.Future[bytes],
                 deadline: float | None, now: float, queue: _KeyQueue) -> None:
        self.call = call
        self.rows: int = call.rows
        self.future = future
        self.deadline = deadline
        self.enqueued_at = now
        self.queue = queue
        self.next_row = 0  # rows before this one are already in batches
        self.rows_answered = 0
        self.parts: list[tuple[int, bytes]] | None = None  # only for calls cut into pieces
        self.dead = False  # answered with an error, cancelled or expired
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, start: int, stop: int, response: bytes) -> None:
        if self.future.done():
            return
        if start == 0 and stop == self.rows:
            self.future.set_result(response)
            return
        if self.parts is None:
            self.parts = []
        self.parts.append((start, response))
        self.rows_answered += stop - start
        if self.rows_answered == self.rows:
            self.parts.sort(key=lambda part: part[0])
            try:
                joined = codec.concat_predict_responses([part for _, part in self.parts])
            except codec.CodecError as err:
                self.future.set_exception(ProxyError.from_codec_error(err))
                return
            self.future.set_result(joined)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _KeyQueue:
    """The calls waiting for one batch key, oldest first."""

    __slots__ = ("entries", "key", "rows")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.entries: collections.deque[_Entry] = collections.deque()
        self.rows = 0  # rows of live entries not yet taken into a batch

    def head(self) -> _Entry | None:
        entries = self.entries
        while entries and entries[0].dead:
            entries.popleft()
        return entries[0] if entries else None


@dataclass
class Batch:
    """Rows [start, stop) of each entry, in order; encoded once, sent to one replica."""

    model: str
    pieces: list[tuple[_Entry, int, int]]
    request: bytes
    rows: int
    deadline: float | None  # the tightest deadline of its calls, loop time

    @classmethod
    def of(cls, model: str, pieces: list[tuple[_Entry, int, int]]) -> Batch:
        deadlines = [entry.deadline for entry, _, _ in pieces if entry.deadline is not None]
        request = codec.encode_predict_request(
            [(entry.call, start, stop) for entry, start, stop in pieces])
        rows = sum(stop - start for _, start, stop in pieces)
        return cls(model, pieces, request, rows, min(deadlines) if deadlines else None)


# A replica refusing a merged batch's content may be refusing just one call in it.
POISON_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.FAILED_PRECONDITION})


class Batcher:
    def __init__(self, config: BatchingConfig, pool: ReplicaPool,
                 metrics: ProxyMetrics | None = None) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics or ProxyMetrics()
        self._queues: dict[tuple, _KeyQueue] = {}
        self.queued_rows = 0
        self.service_time_s: float | None = None  # mean replica time per batch
        self._waiter: asyncio.Future[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        pool.capacity_listeners.append(self._wake)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def close(self) -> None:
        """Stop taking batches; in-flight batches finish; calls still queued are refused."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
            self._scheduler = None
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        error = ProxyError(grpc.StatusCode.UNAVAILABLE, "batchproxy is shutting down")
        for queue in self._queues.values():
            for entry in queue.entries:
                entry.fail(error)
        self._queues.clear()
        self.queued_rows = 0

    async def drain(self) -> None:
        """Wait until every queued row has been sent and answered."""
        while self.queued_rows or self._sending:
            self._wake()
            await asyncio.sleep(0.005)

    # -- submitting ------------------------------------------------------------------------

    async def submit(self, call: codec.PredictCall, timeout: float | None = None) -> bytes:
        """Queue a batchable call (call.rows >= 1) and wait for its own answer."""
        rows = call.rows
        model = call.model_name
        self.pool.note_model(model)
        if self.pool.route(model) is Route.NOWHERE:
            self.metrics.reject("no_replica")
            raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                             f"no healthy replica serves model '{model}'")
        if self.queued_rows + rows > self.config.max_enqueued_rows:
            self.metrics.reject("queue_full")
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE,
                f"The batch scheduling queue to which this task was submitted is full "
                f"({self.queued_rows} rows queued, limit {self.config.max_enqueued_rows})",
            )
        if timeout is not None:
            wait = self.expected_wait_s(rows)
            # A margin for what the estimate leaves out: the batch timeout, the way back.
            if wait > 0.8 * timeout - self.config.batch_timeout_s:
                # It would expire in the queue anyway: say so now, while the caller can still
                # go elsewhere, instead of holding it until its deadline.
                self.metrics.reject("deadline_unreachable")
                raise ProxyError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"The batch queue is too long for this call's deadline (expected wait "
                    f"{wait * 1000:.0f} ms, deadline {timeout * 1000:.0f} ms)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        queue = self._queues.get(call.key)
        if queue is None:
            queue = self._queues[call.key] = _KeyQueue(call.key)
        deadline = None if timeout is None else now + timeout
        entry = _Entry(call, loop.create_future(), deadline, now, queue)
        was_idle = queue.rows == 0
        queue.entries.append(entry)
        queue.rows += rows
        self.queued_rows += rows
        if deadline is not None:
            entry.timer = loop.call_at(deadline, self._expire, entry)
        full = self.config.max_batch_size
        if was_idle or queue.rows - rows < full <= queue.rows:
            self._wake()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._abandon(entry)
            raise
        finally:
            if entry.timer is not None:
                entry.timer.cancel()

    def _note_service_time(self, seconds: float) -> None:
        # An exponentially weighted mean: recent batches matter most (replicas slow down).
        if self.service_time_s is None:
            self.service_time_s = seconds
        else:
            self.service_time_s += 0.1 * (seconds - self.service_time_s)

    def expected_wait_s(self, rows: int) -> float:
        """A rough time to answer `rows` more rows: the batches ahead of them, served by all
        the replica slots in parallel, then their own batch. 0 until a batch was timed, and
        0 with no full batch ahead: a call that would go out next is never refused on a
        guess (its replica decides)."""
        if self.service_time_s is None:
            return 0.0
        batches_ahead = (self.queued_rows + rows) // self.config.max_batch_size
        if batches_ahead == 0:
            return 0.0
        slots = max(self.pool.max_inflight * len(self.pool.replicas), 1)
        return (batches_ahead / slots + 1) * self.service_time_s

    def _expire(self, entry: _Entry) -> None:
        if entry.future.done():
            return
        where = "in the queue" if entry.next_row < entry.rows else "at the replica"
        self.metrics.reject("deadline")
        entry.fail(ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"Deadline exceeded while waiting {where}"))
        self._abandon(entry)

    def _abandon(self, entry: _Entry) -> None:
        """Take an answered-early call's untaken rows out of the counts; they are never sent."""
        if entry.dead:
            return
        entry.dead = True
        untaken = entry.rows - entry.next_row
        entry.next_row = entry.rows
        entry.queue.rows -= untaken
        self.queued_rows -= untaken

    # -- scheduling ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            next_due = self._dispatch_due(loop.time())
            await self._sleep_until(loop, next_due)

    def _dispatch_due(self, now: float) -> float | None:
        """Send every batch that is due and has a replica slot, oldest first. Returns when
        the next queue that is not due yet will be; due queues without a slot wait for the
        pool to report capacity (and keep filling meanwhile)."""
        timeout = self.config.batch_timeout_s
        full = self.config.max_batch_size
        due: list[tuple[float, _KeyQueue]] = []
        next_due: float | None = None
        for key, queue in list(self._queues.items()):
            head = queue.head() if queue.rows > 0 else None
            if head is None:
                del self._queues[key]
                continue
            due_at = head.enqueued_at + timeout
            if queue.rows >= full or due_at <= now:
                due.append((head.enqueued_at, queue))
            elif next_due is None or due_at < next_due:
                next_due = due_at
        due.sort(key=lambda item: item[0])
        for _, queue in due:
            model = queue.key[0]
            while queue.rows > 0:
                # A replica already working on a batch gets a second one only when it is
                # full: a partial batch waits here, where it keeps filling, until a replica
                # is idle (a GPU runs one batch at a time; what waits at the replica is
                # frozen at the size it had when sent).
                replica = self.pool.try_acquire(model, idle_only=queue.rows < full)
                if replica is None:
                    if self.pool.route(model) is Route.NOWHERE:
                        self._fail_queue(queue, ProxyError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"no healthy replica serves model '{model}'"))
                    break
                batch = self._take_batch(queue)
                if batch is None:
                    self.pool.release(replica)
                    break
                self._spawn(self._send(replica, batch))
                head = queue.head()
                if queue.rows < full and (head is None or head.enqueued_at + timeout > now):
                    break  # the rest is not due yet
        return next_due

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        waiter = self._waiter = loop.create_future()
        handle = None
        if when is not None:
            handle = loop.call_at(when, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _take_batch(self, queue: _KeyQueue) -> Batch | None:
        room = self.config.max_batch_size
        pieces: list[tuple[_Entry, int, int]] = []
        entries = queue.entries
        waited = self.metrics.queue_wait.observe
        now = asyncio.get_running_loop().time()
        while room and entries:
            entry = entries[0]
            if entry.dead:
                entries.popleft()
                continue
            start = entry.next_row
            if start == 0:
                waited(now - entry.enqueued_at)
            take = min(room, entry.rows - start)
            pieces.append((entry, start, start + take))
            entry.next_row = start + take
            room -= take
            if entry.next_row == entry.rows:
                entries.popleft()
        if not pieces:
            return None
        rows = self.config.max_batch_size - room
        queue.rows -= rows
        self.queued_rows -= rows
        return Batch.of(queue.key[0], pieces)

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, replica: Replica, batch: Batch) -> None:
        """Send `batch`, retrying once elsewhere if the replica failed, bisecting it if the
        replica refused the batch's content, and answer each of its calls."""
        loop = asyncio.get_running_loop()
        self.metrics.observe_batch(replica.address, batch.rows, len(batch.pieces))
        retried = False
        while True:
            timeout = None
            if batch.deadline is not None:
                timeout = batch.deadline - loop.time()
            try:
                if timeout is not None and timeout <= 0:
                    raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     "Deadline exceeded before the batch was sent")
                sent_at = loop.time()
                response = await self.pool.predict(replica, batch.request, timeout)
                self._note_service_time(loop.time() - sent_at)
            except ProxyError as err:
                self.pool.release(replica)
                if is_replica_failure(err) and not retried and len(self.pool.replicas) > 1:
                    retried = True
                    try:
                        replica = await self.pool.acquire(batch.model, exclude=replica,
                                                          timeout=timeout)
                    except ProxyError:
                        self._fail_batch(batch, err)
                        return
                    self.metrics.retries.inc()
                    continue
                if err.code in POISON_CODES and len(batch.pieces) > 1:
                    await self._bisect(batch)
                    return
                self._fail_batch(batch, err)
                return
            self.pool.release(replica)
            break
        try:
            parts = codec.split_predict_response(
                response, [stop - start for _, start, stop in batch.pieces])
        except codec.CodecError as err:
            error = ProxyError.from_codec_error(err)
            log.warning("replica %s answered a batch that cannot be split: %s",
                        replica.address, error.message)
            self._fail_batch(batch, error)
            return
        for (entry, start, stop), part in zip(batch.pieces, parts, strict=True):
            entry.deliver(start, stop, part)

    async def _bisect(self, batch: Batch) -> None:
        """One call may have poisoned the batch: send each half on its own, recursively, so
        that only the offending call fails and the others get their answers."""
        middle = len(batch.pieces) // 2
        halves = [Batch.of(batch.model, batch.pieces[:middle]),
                  Batch.of(batch.model, batch.pieces[middle:])]

        async def send_half(half: Batch) -> None:
            loop = asyncio.get_running_loop()
            timeout = None if half.deadline is None else half.deadline - loop.time()
            try:
                replica = await self.pool.acquire(half.model, timeout=timeout)
            except ProxyError as err:
                self._fail_batch(half, err)
                return
            await self._send(replica, half)

        await asyncio.gather(*(send_half(half) for half in halves))

    def _fail_queue(self, queue: _KeyQueue, error: ProxyError) -> None:
        for entry in list(queue.entries):
            entry.fail(error)
            self._abandon(entry)
        queue.entries.clear()

    def _fail_batch(self, batch: Batch, error: ProxyError) -> None:
        # A call cut into pieces fails whole: its rows still queued are dropped too.
        for entry, _, _ in batch.pieces:
            entry.fail(error)
            self._abandon(entry)
