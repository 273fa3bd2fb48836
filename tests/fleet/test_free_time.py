"""A replica's expected free time (fleet/slots.py), on the virtual clock: it moves past each
batch the scheduler takes, and when a batch with another waiting behind it answers early or
late, the one behind starts then, so the free time moves by as much; the round trip of the
replica's health checks is followed."""

from __future__ import annotations

import asyncio

import pytest

from batchproxy.fleet.slots import Endpoint, ReplicaPool
from batchproxy.sim.clock import run_virtual

MODEL = "m"


def serial_replica() -> tuple[ReplicaPool, Endpoint]:
    pool = ReplicaPool(["127.0.0.1:1"], max_inflight=2)
    (replica,) = pool.replicas.values()
    cost = replica.cost(MODEL)
    cost.first_seen = True
    for _ in range(10):
        cost.observe(4, 0.1)  # a batch of 4 rows takes 100 ms here
    return pool, replica


def send(pool: ReplicaPool, replica: Endpoint) -> float:
    """A batch of 4 rows taken by the scheduler and sent; when it is expected to answer."""
    replica.outstanding += 1  # its slot, as the pool's acquire holds it
    pool.note_planned(replica, MODEL, 4)
    pool.note_sent(replica, MODEL, 4, planned=True)
    return replica.free_at


def answer(pool: ReplicaPool, replica: Endpoint, seconds: float, expected_at: float) -> None:
    pool.note_answered(replica, MODEL, 4, seconds, 0, expected_at)
    replica.outstanding -= 1


@pytest.mark.parametrize("late_s", [0.02, -0.02, 0.0])
def test_the_batch_behind_starts_when_the_one_before_answers(late_s: float) -> None:
    async def main() -> tuple[float, float, float]:
        pool, replica = serial_replica()
        start = asyncio.get_running_loop().time()
        first = send(pool, replica)
        behind = send(pool, replica)  # waits at the replica behind the first
        await asyncio.sleep(0.1 + late_s)
        answer(pool, replica, 0.1 + late_s, first)
        return start, behind, replica.free_at

    start, behind, free_at = run_virtual(main())
    assert behind == pytest.approx(start + 0.2)
    # Its 100 ms run began with the first one's answer, early or late.
    assert free_at == pytest.approx(start + 0.2 + late_s)


def test_a_replica_left_with_nothing_is_free_at_its_answer() -> None:
    async def main() -> tuple[float, float]:
        pool, replica = serial_replica()
        first = send(pool, replica)
        await asyncio.sleep(0.13)
        answer(pool, replica, 0.13, first)
        return asyncio.get_running_loop().time(), replica.free_at

    now, free_at = run_virtual(main())
    assert free_at == now


def test_the_round_trip_follows_a_longer_one_fast_and_a_shorter_one_slowly() -> None:
    _, replica = serial_replica()
    assert replica.trip_s == 0.0
    replica.note_trip(0.004)
    replica.note_trip(0.004)
    rising = replica.trip_s
    for _ in range(20):
        replica.note_trip(0.004)
    assert 0 < rising < replica.trip_s == pytest.approx(0.004, rel=0.01)
    replica.note_trip(0.0)
    assert replica.trip_s > 0.9 * 0.004  # one short trip barely moves it
    replica.note_trip(float("nan"))
    replica.note_trip(-1.0)  # a clock step back: ignored
    assert 0 < replica.trip_s < 0.004
