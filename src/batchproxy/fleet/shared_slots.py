"""--workers N: one view of the fleet's slots and ejections across the forked workers.

Without it every worker believes it owns every slot of every replica, and N workers send a
replica N x --max_inflight_per_replica batches at once. The parent creates a `SlotTable`
before it forks: a small file in /dev/shm (unlinked at once, so nothing is left behind),
mmap'd by every worker, one row per replica address:

    row = address (256 bytes) | ejected until (monotonic ns) | in flight | in flight, per worker

Taking a slot checks the row's total against the limit and adds one to the total and to
this worker's count, under a POSIX record lock (fcntl) on that row's byte; giving it back
subtracts both under the same lock. The kernel drops such a lock when its holder dies, so a
killed worker never leaves a lock held, and its own count says how much of the total it
took with it: the parent subtracts that (`reclaim`) when it reaps the worker. Reads for
choosing (power of two choices, the policy's look at `outstanding`) read the total, one
aligned word, without a lock; only reservations lock.

A worker that found no free slot raises its `waiting` word; a worker that frees a slot
writes one byte to the wake pipe of each waiting worker, whose event loop then tells its
batcher to look again. Both sides pass a lock or fence between writing their word and
reading the other's, so a wake-up is not lost; a slow poll (`SAFETY_POLL_S`, armed only
while the worker is short of slots) covers a waiter whose waker was killed between the two.
An ejection is written to the row and every other worker is woken to apply it, so one
worker's verdict on a failing replica holds for all of them."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from batchproxy.fleet.slots import Endpoint, ModelState, ReplicaPool, ReplicaState, loop_time
from batchproxy.fleet.transport import Transport

log = logging.getLogger(__name__)

ROWS = 1024  # replica addresses one table holds (rows are kept when a replica drains)
ADDRESS_BYTES = 256
HEADER_WORDS = 8
WORD = 8
MAGIC = 0x62707368617265  # "bpshare"
# While short of slots, look again at least this often (a lost wake-up costs this much).
SAFETY_POLL_S = 0.05
# The reason given when a worker applies another's ejection: counted once, where it began.
EJECTED_ELSEWHERE = "ejected by another worker"
_DIRECTORY_LOCK = 0  # byte 0: claiming rows, and the fence; byte 1 + row: that row
_GENERATION = 3  # header word: ejections written so far
_EJECTED = ADDRESS_BYTES // WORD  # a row's words: address, then ejected until, then counts


def _row_words(workers: int) -> int:
    return _EJECTED + 2 + workers


def _size(workers: int, rows: int) -> int:
    return (HEADER_WORDS + workers + rows * _row_words(workers)) * WORD


class SlotTable:
    """The shared counts; see the module's comment for the layout and the protocol."""

    def __init__(self, fd: int, workers: int, rows: int, wake: list[tuple[int, int]]) -> None:
        self.fd = fd
        self.workers = workers
        self.rows = rows
        self.wake = wake  # per worker: (read end, write end) of its wake pipe
        self.row_words = _row_words(workers)
        self.size = _size(workers, rows)
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        self.words = memoryview(self.map).cast("q")
        self.worker = -1  # set in each worker by attach()
        self.owns_files = False  # the table create() made closes the file and the pipes
        # Where the workers agree on who warms which replica (fleet/warmup_claims.py).
        self.warmup_dir: str | None = None

    @classmethod
    def create(cls, workers: int, rows: int = ROWS) -> SlotTable:
        """In the parent, before the workers fork."""
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="batchproxy-slots-", dir=directory)
        os.unlink(path)  # the workers inherit the descriptor; no file outlives them
        wake = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(workers)]
        os.ftruncate(fd, _size(workers, rows))
        table = cls(fd, workers, rows, wake)
        table.owns_files = True
        table.warmup_dir = tempfile.mkdtemp(prefix="batchproxy-warmup-")
        table.words[0], table.words[1], table.words[2] = MAGIC, workers, rows
        return table

    def attach(self, worker: int) -> None:
        """In worker `worker`, after the fork."""
        self.worker = worker

    def view(self, worker: int) -> SlotTable:
        """Another mapping of the same table, as worker `worker` sees it (tests run two
        workers' pools in one process this way)."""
        other = SlotTable(self.fd, self.workers, self.rows, self.wake)
        other.warmup_dir = self.warmup_dir
        other.attach(worker)
        return other

    # -- layout -----------------------------------------------------------------------------

    def _row_word(self, row: int) -> int:
        return HEADER_WORDS + self.workers + row * self.row_words

    def total_word(self, row: int) -> int:
        """Index in `words` of the row's total in flight; this worker's count follows it at
        1 + worker."""
        return self._row_word(row) + _EJECTED + 1

    def _lock(self, byte: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, byte)

    def _unlock(self, byte: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)

    def row_for(self, address: str) -> int | None:
        """The row of `address`, claimed if no worker has claimed it yet; None when full."""
        key = address.encode()
        if len(key) >= ADDRESS_BYTES:
            key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
        padded = key.ljust(ADDRESS_BYTES, b"\0")
        self._lock(_DIRECTORY_LOCK)
        try:
            for row in range(self.rows):
                start = self._row_word(row) * WORD
                stored = self.map[start:start + ADDRESS_BYTES]
                if stored == padded:
                    return row
                if stored[0] == 0:
                    self.map[start:start + ADDRESS_BYTES] = padded
                    return row
        finally:
            self._unlock(_DIRECTORY_LOCK)
        return None

    # -- slots ------------------------------------------------------------------------------

    def in_flight(self, row: int) -> int:
        """Batches every worker holds on the row's replica (read without a lock)."""
        return self.words[self.total_word(row)]

    def held(self, row: int, worker: int) -> int:
        return self.words[self.total_word(row) + 1 + worker]

    def take(self, row: int, limit: int) -> bool:
        """One more batch for this worker on the row, if all workers hold fewer than
        `limit`."""
        words, total = self.words, self.total_word(row)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 1 + row)
        try:
            if words[total] >= limit:
                return False
            words[total] += 1
            words[total + 1 + self.worker] += 1
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1 + row)

    def give(self, row: int) -> None:
        """This worker's batch on the row is done: the counts drop, waiting workers wake."""
        words, total = self.words, self.total_word(row)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 1 + row)
        try:
            words[total] -= 1
            words[total + 1 + self.worker] -= 1
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1 + row)  # the fence before reading flags
        self.wake_waiting()

    def mark_waiting(self) -> None:
        """This worker found no free slot: the next slot freed anywhere wakes it. The fence
        orders this write before the caller's next look at the counts."""
        self.words[HEADER_WORDS + self.worker] = 1
        self._lock(_DIRECTORY_LOCK)
        self._unlock(_DIRECTORY_LOCK)

    def wake_waiting(self) -> None:
        words = self.words
        for worker in range(self.workers):
            if words[HEADER_WORDS + worker] and worker != self.worker:
                words[HEADER_WORDS + worker] = 0
                self._wake(worker)

    def wake_all(self) -> None:
        for worker in range(self.workers):
            if worker != self.worker:
                self._wake(worker)

    def _wake(self, worker: int) -> None:
        # A full pipe already holds a wake-up the worker has not read: one is enough.
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake[worker][1], b"w")

    def wake_fd(self) -> int:
        return self.wake[self.worker][0]

    def reclaim(self, worker: int) -> int:
        """In the parent: worker `worker` is gone; its batches are no one's now. Returns how
        many it held."""
        freed = 0
        for row in range(self.rows):
            total = self.total_word(row)
            if self.words[total + 1 + worker]:
                self._lock(1 + row)
                try:
                    held = self.words[total + 1 + worker]
                    self.words[total] -= held
                    self.words[total + 1 + worker] = 0
                    freed += held
                finally:
                    self._unlock(1 + row)
        self.words[HEADER_WORDS + worker] = 0
        self.wake_all()
        return freed

    # -- ejections ----------------------------------------------------------------------------

    def ejected_until_ns(self, row: int) -> int:
        return self.words[self._row_word(row) + _EJECTED]

    def set_ejected_until_ns(self, row: int, until_ns: int) -> None:
        self.words[self._row_word(row) + _EJECTED] = until_ns
        # The generation tells a woken worker whether there is any ejection to look for:
        # most wake-ups are freed slots. Under the lock, so that no increment is lost.
        self._lock(_DIRECTORY_LOCK)
        try:
            self.words[_GENERATION] += 1
        finally:
            self._unlock(_DIRECTORY_LOCK)

    def ejection_generation(self) -> int:
        return self.words[_GENERATION]

    def close(self) -> None:
        self.words.release()
        self.map.close()
        if not self.owns_files:
            return
        if self.warmup_dir is not None:
            shutil.rmtree(self.warmup_dir, ignore_errors=True)
        os.close(self.fd)
        for read_end, write_end in self.wake:
            os.close(read_end)
            os.close(write_end)


# The table of this process: set by workers.run_workers() before the fork, None otherwise.
_TABLE: SlotTable | None = None


def install(table: SlotTable | None) -> None:
    global _TABLE
    _TABLE = table


def table() -> SlotTable | None:
    return _TABLE


def pool_class() -> type[ReplicaPool]:
    """The pool a proxy builds: shared slots in a worker of several, else the plain one."""
    return ReplicaPool if _TABLE is None or _TABLE.worker < 0 else SharedReplicaPool


class SharedEndpoint(Endpoint):
    """An endpoint whose `outstanding` is what all workers hold on it; `held` is this
    worker's part (what it must finish before it drops a draining replica)."""

    def __init__(self, address: str, transport: Transport, table: SlotTable) -> None:
        self.table = table
        self.row = table.row_for(address)
        if self.row is None:
            log.warning("replica %s: the shared slot table is full; this worker counts "
                        "only its own batches on it", address)
        self.held = 0
        self._words = table.words
        self._total = -1 if self.row is None else table.total_word(self.row)
        super().__init__(address, transport)

    @property
    def outstanding(self) -> int:
        return self.held if self._total < 0 else self._words[self._total]

    @outstanding.setter
    def outstanding(self, value: int) -> None:
        # Endpoint.__init__ starts the count at 0; the table holds it from then on.
        if value != 0:
            raise AttributeError("a shared endpoint's count changes by take/give only")


class SharedReplicaPool(ReplicaPool):
    """ReplicaPool whose slot counts and ejections are shared with the other workers."""

    def __init__(self, addresses: Iterable[str] = (), max_inflight: int = 2,
                 default_timeout_s: float = 30.0, *, table: SlotTable | None = None,
                 **options: Any) -> None:
        shared = table or _TABLE
        if shared is None or shared.worker < 0:
            raise RuntimeError("SharedReplicaPool needs the table of a forked worker")
        self.table = shared
        self._reading: asyncio.AbstractEventLoop | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._retrying = False
        self._ejections_seen = shared.ejection_generation()
        super().__init__((), max_inflight, default_timeout_s, **options)
        for address in addresses:
            self.add(address)

    def add(self, address: str) -> Endpoint:
        if address not in self.replicas:
            self._routes.clear()
            replica = self.replicas[address] = SharedEndpoint(
                address, self.transports(address), self.table)
            log.info("replica %s joined", address)
            return replica
        return super().add(address)

    # -- slots ------------------------------------------------------------------------------

    def _take(self, replica: Endpoint, limit: int) -> bool:
        assert isinstance(replica, SharedEndpoint)
        if replica.row is None:
            if replica.held >= limit:
                return False
        elif not self.table.take(replica.row, limit):
            return False
        replica.held += 1
        replica.batches_sent += 1
        return True

    def _give(self, replica: Endpoint) -> None:
        assert isinstance(replica, SharedEndpoint)
        replica.held -= 1
        if replica.row is not None:
            self.table.give(replica.row)

    def _no_slot(self, model: str, exclude: Endpoint | None,
                 idle_only: bool, version: int | None = None) -> Endpoint | None:
        if self._retrying:
            return None
        self._wait_for_others()
        # Look once more after the fence: a slot freed before the mark went up is seen now.
        self._retrying = True
        try:
            return self.try_acquire(model, exclude, idle_only, version)
        finally:
            self._retrying = False

    def try_acquire_on(self, replica: Endpoint, model: str,
                       version: int | None = None) -> Endpoint | None:
        taken = super().try_acquire_on(replica, model, version)
        if taken is None and replica.outstanding >= self.max_inflight:
            self._wait_for_others()
            taken = super().try_acquire_on(replica, model, version)
        return taken

    def _wait_elsewhere(self) -> None:
        self._wait_for_others()

    def _wait_for_others(self) -> None:
        """Be woken when another worker frees a slot, and look again now and then anyway."""
        self.table.mark_waiting()
        loop = self._ensure_reader()
        if loop is not None and self._poll is None:
            self._poll = loop.call_later(SAFETY_POLL_S, self._poll_due)

    def _poll_due(self) -> None:
        self._poll = None
        self._notify_capacity()

    def _drop_if_drained(self, replica: Endpoint) -> None:
        # What this worker waits for is its own batches; the others drop theirs themselves.
        held = replica.held if isinstance(replica, SharedEndpoint) else replica.outstanding
        if (replica.state is ReplicaState.DRAINING and held == 0
                and self.replicas.get(replica.address) is replica):
            del self.replicas[replica.address]
            self._routes.clear()
            log.info("replica %s drained and dropped", replica.address)
            self._closing.append(replica)

    def record_check(self, replica: Endpoint, passed: bool, reason: str = "",
                     models: dict[str, ModelState] | None = None,
                     certain: bool = True,
                     versions: dict[str, dict[int, int]] | None = None) -> None:
        # Health checks run in every worker: from the first one on, hear the others.
        self._ensure_reader()
        super().record_check(replica, passed, reason, models, certain, versions)

    # -- wake-ups from other workers ----------------------------------------------------------

    def _ensure_reader(self) -> asyncio.AbstractEventLoop | None:
        if self._reading is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            loop.add_reader(self.table.wake_fd(), self._woken)
            self._reading = loop
        return self._reading

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self.table.wake_fd(), 4096)) == 4096:
                pass
        generation = self.table.ejection_generation()
        if generation != self._ejections_seen:
            self._ejections_seen = generation
            self._apply_ejections()
        self._notify_capacity()

    # -- ejections ----------------------------------------------------------------------------

    def _eject(self, replica: Endpoint, reason: str) -> None:
        super()._eject(replica, reason)
        if isinstance(replica, SharedEndpoint) and replica.row is not None:
            remaining = max(replica.ejected_until - loop_time(), 0.0)
            self.table.set_ejected_until_ns(replica.row,
                                            time.monotonic_ns() + int(remaining * 1e9))
            self.table.wake_all()
            self._ensure_reader()

    def _apply_ejections(self) -> None:
        """Eject here what another worker ejected, for the back-off it chose."""
        now_ns = time.monotonic_ns()
        for replica in list(self.replicas.values()):
            if not isinstance(replica, SharedEndpoint) or replica.row is None:
                continue
            until_ns = self.table.ejected_until_ns(replica.row)
            if until_ns > now_ns and replica.state is ReplicaState.HEALTHY:
                replica.ejections += 1
                replica.ejected_until = loop_time() + (until_ns - now_ns) / 1e9
                self._set_state(replica, ReplicaState.EJECTED,
                                f"{EJECTED_ELSEWHERE} for {(until_ns - now_ns) / 1e9:.1f}s")

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.remove_reader(self.table.wake_fd())
            self._reading = None
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        await super().close()
