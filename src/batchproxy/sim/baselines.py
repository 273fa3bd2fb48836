"""The alternatives the proxy is compared with, modelled on the same simulated replicas.

- `DirectSystem`: no batching. Each call goes alone to the next replica in round robin and
  queues there (what clients do without a proxy).
- `TfsSystem`: TFS's own batching in each replica behind round robin, following the rules
  of TensorFlow's SharedBatchScheduler: each model has a queue of batches per replica; a
  call that does not fit the open batch closes it and opens a new one (no splitting); a batch
  that becomes full closes at once; each of the replica's `concurrency` batch threads takes
  the oldest closed batch when it is free, or else the open batch once its oldest call has
  waited `batch_timeout_micros`; queues are served round robin. A call finding
  `max_enqueued_batches` batches queued is refused with UNAVAILABLE, and a batch whose
  callers have all given up is dropped unrun, as TFS's batching session does.

Both talk to replicas through `SimReplica.serve`: the cost model, without bytes."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

import grpc

from batchproxy.errors import ProxyError
from batchproxy.sim.replicas import SimReplica, deadline_exceeded, unavailable
from batchproxy.sim.workloads import Arrival, Shape


class DirectSystem:
    name = "direct"

    def __init__(self, replicas: Sequence[SimReplica], shapes: Sequence[Shape]) -> None:
        self.replicas = list(replicas)
        self.shapes = shapes
        self._next = 0

    def start(self) -> None:
        pass

    async def submit(self, arrival: Arrival) -> None:
        replica = self.replicas[self._next]
        self._next = (self._next + 1) % len(self.replicas)
        shape = self.shapes[arrival.shape]
        await replica.serve(shape.model, shape.rows, arrival.deadline_s)

    async def close(self) -> None:
        pass


class _Task:
    __slots__ = ("deadline", "future", "rows")

    def __init__(self, rows: int, deadline: float | None, future: asyncio.Future[None]) -> None:
        self.rows = rows
        self.deadline = deadline
        self.future = future


class _Batch:
    __slots__ = ("opened_at", "rows", "tasks")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.rows = 0
        self.tasks: list[_Task] = []


class _ModelQueue:
    __slots__ = ("closed", "model", "open")

    def __init__(self, model: str) -> None:
        self.model = model
        self.open: _Batch | None = None
        self.closed: collections.deque[_Batch] = collections.deque()

    def batches(self) -> int:
        return len(self.closed) + (self.open is not None)


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_error(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class TfsReplicaBatcher:
    """TFS's batch scheduler inside one replica."""

    def __init__(self, replica: SimReplica, max_batch_size: int, batch_timeout_s: float,
                 max_enqueued_batches: int) -> None:
        self.replica = replica
        self.max_batch_size = max_batch_size
        self.timeout_s = batch_timeout_s
        self.max_enqueued_batches = max_enqueued_batches
        self.free_threads = replica.concurrency
        self.queues: dict[str, _ModelQueue] = {}
        self._order: list[_ModelQueue] = []  # round robin over queues, in creation order
        self._turn = 0
        self._running: set[asyncio.Task[None]] = set()

    def enqueue(self, model: str, rows: int, deadline: float | None) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        faults = self.replica.faults
        if faults.crashes and faults.crashed(now):
            raise unavailable(self.replica.address)
        if rows > self.max_batch_size:
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Task size {rows} is larger than maximum input batch size "
                             f"{self.max_batch_size}")
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = _ModelQueue(model)
            self._order.append(queue)
        batch = queue.open
        if batch is not None and batch.rows + rows > self.max_batch_size:
            queue.closed.append(batch)
            batch = queue.open = None
        if batch is None:
            if queue.batches() >= self.max_enqueued_batches:
                raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                                 "The batch scheduling queue to which this task was submitted "
                                 "is full")
            batch = queue.open = _Batch(now)
            # The moment this batch may leave partial: look for a free thread then.
            loop.call_at(now + self.timeout_s, self._pump)
        future: asyncio.Future[None] = loop.create_future()
        batch.tasks.append(_Task(rows, deadline, future))
        batch.rows += rows
        if batch.rows == self.max_batch_size:
            queue.closed.append(batch)
            queue.open = None
        self._pump()
        return future

    def _next_batch(self, now: float) -> tuple[str, _Batch] | None:
        """A free thread's pick: the next queue in turn with a closed batch, or with an open
        one whose oldest call has waited the timeout."""
        count = len(self._order)
        for step in range(count):
            queue = self._order[(self._turn + step) % count]
            batch = None
            if queue.closed:
                batch = queue.closed.popleft()
            elif queue.open is not None and queue.open.opened_at + self.timeout_s <= now:
                batch, queue.open = queue.open, None
            if batch is not None:
                self._turn = (self._turn + step + 1) % count
                return queue.model, batch
        return None

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self.free_threads > 0:
            picked = self._next_batch(loop.time())
            if picked is None:
                return
            self.free_threads -= 1
            task = loop.create_task(self._run(*picked))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, model: str, batch: _Batch) -> None:
        now = asyncio.get_running_loop().time()
        try:
            if all(t.deadline is not None and t.deadline <= now for t in batch.tasks):
                error: ProxyError | None = deadline_exceeded()
            else:
                error = None
                try:
                    await self.replica.serve(model, batch.rows, None)
                except ProxyError as err:
                    error = err
            for t in batch.tasks:
                if error is None:
                    _set_none(t.future)
                else:
                    _set_error(t.future, error)
        finally:
            self.free_threads += 1
            self._pump()


class TfsSystem:
    name = "tfs"

    def __init__(self, replicas: Sequence[SimReplica], shapes: Sequence[Shape],
                 max_batch_size: int, batch_timeout_s: float,
                 max_enqueued_batches: int) -> None:
        self.batchers = [TfsReplicaBatcher(r, max_batch_size, batch_timeout_s,
                                           max_enqueued_batches) for r in replicas]
        self.shapes = shapes
        self._next = 0

    def start(self) -> None:
        pass

    async def submit(self, arrival: Arrival) -> None:
        batcher = self.batchers[self._next]
        self._next = (self._next + 1) % len(self.batchers)
        shape = self.shapes[arrival.shape]
        loop = asyncio.get_running_loop()
        deadline = None if arrival.deadline_s is None else loop.time() + arrival.deadline_s
        future = batcher.enqueue(shape.model, shape.rows, deadline)
        if deadline is None:
            await future
            return
        # The caller's gRPC deadline: it stops waiting whatever the replica does.
        timer = loop.call_at(deadline, _set_error, future, deadline_exceeded())
        try:
            await future
        finally:
            timer.cancel()

    async def close(self) -> None:
        pass
