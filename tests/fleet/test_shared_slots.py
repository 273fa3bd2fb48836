"""The slot table --workers share (fleet/shared_slots.py): counts summed over workers, a
dead worker's slots handed back, waiters in another worker woken, ejections heard by all.
Two workers' pools run in one process over two mappings of one table; the death of a
worker is a real forked child that exits holding a slot."""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Iterator

import grpc
import pytest

from batchproxy.errors import ProxyError
from batchproxy.fleet.shared_slots import (
    EJECTED_ELSEWHERE,
    SharedReplicaPool,
    SlotTable,
    pool_class,
)
from batchproxy.fleet.slots import ModelState, ReplicaPool, ReplicaState

A, B = "10.0.0.1:8500", "10.0.0.2:8500"


class NoTransport:
    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        raise AssertionError("no call is made in these tests")

    async def close(self) -> None:
        pass


@pytest.fixture
def table() -> Iterator[SlotTable]:
    shared = SlotTable.create(workers=2, rows=8)
    shared.attach(0)
    yield shared
    shared.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def pools(table: SlotTable, max_inflight: int = 1) -> tuple[SharedReplicaPool,
                                                            SharedReplicaPool]:
    def make(view: SlotTable) -> SharedReplicaPool:
        pool = SharedReplicaPool([A, B], max_inflight, table=view,
                                 transports=lambda address: NoTransport(), seed=0)
        for replica in pool.replicas.values():
            pool.record_check(replica, True, models={"m": ModelState.AVAILABLE})
        return pool
    return make(table), make(table.view(1))


def test_rows_are_keyed_by_address(table: SlotTable) -> None:
    assert table.row_for(A) == 0
    assert table.row_for(B) == 1
    assert table.view(1).row_for(A) == 0
    assert table.row_for("x" * 400) == 2  # too long to store: stored as its digest
    assert table.row_for("x" * 400) == 2


def test_a_full_table_leaves_new_replicas_to_each_worker(table: SlotTable) -> None:
    for index in range(8):
        assert table.row_for(f"10.1.0.{index}:8500") == index
    assert table.row_for("10.2.0.1:8500") is None
    pool = SharedReplicaPool(["10.2.0.1:8500"], 1, table=table,
                             transports=lambda address: NoTransport())
    replica = pool.replicas["10.2.0.1:8500"]
    pool.record_check(replica, True)
    assert pool.try_acquire("m") is replica
    assert pool.try_acquire("m") is None
    pool.release(replica)
    assert replica.outstanding == 0


def test_counts_are_summed_over_workers(table: SlotTable) -> None:
    row = table.row_for(A)
    assert row is not None
    other = table.view(1)
    assert table.take(row, 2) and other.take(row, 2)
    assert table.in_flight(row) == 2
    assert not table.take(row, 2) and not other.take(row, 2)
    other.give(row)
    assert table.in_flight(row) == 1
    assert (table.held(row, 0), table.held(row, 1)) == (1, 0)


def test_the_limit_holds_for_the_fleet_not_per_worker(table: SlotTable) -> None:
    first, second = pools(table, max_inflight=1)
    taken = [first.try_acquire("m"), first.try_acquire("m")]
    assert {r.address for r in taken if r is not None} == {A, B}
    assert second.try_acquire("m") is None
    assert [r.outstanding for r in second.replicas.values()] == [1, 1]
    replica = taken[0]
    assert replica is not None
    first.release(replica)
    got = second.try_acquire("m")
    assert got is not None and got.address == replica.address
    assert second.try_acquire_on(second.replicas[B], "m") is None


async def test_a_freed_slot_wakes_the_waiting_worker(table: SlotTable) -> None:
    first, second = pools(table, max_inflight=1)
    held = [first.try_acquire("m"), first.try_acquire("m")]
    woken = asyncio.Event()
    second.capacity_listeners.append(woken.set)
    assert second.try_acquire("m") is None  # short of slots: its wake pipe is watched
    assert not woken.is_set()
    replica = held[0]
    assert replica is not None
    first.release(replica)
    assert readable(table.wake[1][0])  # woken at once, not by the slow poll
    await asyncio.wait_for(woken.wait(), 5)
    assert second.try_acquire("m") is not None
    await second.close()


async def test_acquire_in_one_worker_waits_for_a_slot_freed_in_another(
        table: SlotTable) -> None:
    first, second = pools(table, max_inflight=1)
    held = [first.try_acquire("m"), first.try_acquire("m")]
    waiting = asyncio.ensure_future(second.acquire("m", timeout=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    replica = held[1]
    assert replica is not None
    first.release(replica)
    got = await asyncio.wait_for(waiting, 5)
    assert got.address == replica.address
    await second.close()


def test_no_wake_up_is_written_when_no_one_waits(table: SlotTable) -> None:
    first, _ = pools(table, max_inflight=1)
    replica = first.try_acquire("m")
    assert replica is not None
    first.release(replica)
    assert not readable(table.wake[1][0])


def test_a_dead_workers_slots_are_reclaimed(table: SlotTable) -> None:
    row = table.row_for(A)
    assert row is not None
    pid = os.fork()
    if pid == 0:  # worker 1 takes the slot and dies without giving it back
        table.attach(1)
        os._exit(0 if table.take(row, 1) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.in_flight(row) == 1
    assert not table.take(row, 1)
    assert table.reclaim(1) == 1
    assert table.in_flight(row) == 0
    assert table.take(row, 1)


def test_a_lock_dies_with_its_holder(table: SlotTable) -> None:
    row = table.row_for(A)
    assert row is not None
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # holds the row's lock when killed
        table.attach(1)
        table._lock(1 + row)
        os.write(ready_w, b"1")
        os.pause()
        os._exit(0)
    os.read(ready_r, 1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(ready_w)
    assert table.take(row, 1)  # would block forever had the lock outlived its holder


async def test_an_ejection_in_one_worker_holds_in_the_others(table: SlotTable) -> None:
    first, second = pools(table, max_inflight=2)
    second._ensure_reader()  # as its first health check does
    reasons: list[str] = []
    second.listeners.append(lambda replica, old, reason: reasons.append(reason.split(" for ")[0]))
    changed = second.capacity_changed()
    failure = ProxyError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    for _ in range(first.eject_after_failures):
        first.record_failure(first.replicas[A], failure)
    assert first.replicas[A].state is ReplicaState.EJECTED
    await asyncio.wait_for(changed, 5)
    assert second.replicas[A].state is ReplicaState.EJECTED
    assert reasons == [EJECTED_ELSEWHERE]  # so that it is counted once, where it began
    assert second.replicas[B].state is ReplicaState.HEALTHY
    # Its own passing check does not readmit it before the back-off is over.
    second.record_check(second.replicas[A], True)
    assert second.replicas[A].state is ReplicaState.EJECTED
    await second.close()


def test_one_worker_keeps_the_plain_pool() -> None:
    assert pool_class() is ReplicaPool
