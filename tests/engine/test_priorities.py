"""Priorities in virtual time: which rows a batch takes, who is refused and who is evicted
when the queue fills, and that a sheddable call is still served. One replica, one batch in
flight at a time, so each test first occupies it and then builds the queue it needs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from scripted import (
    POLICIES,
    ScriptedReplica,
    answer_values,
    lone_call_sent_at,
    make_call,
    make_engine,
)

from batchproxy.errors import ProxyError
from batchproxy.priority import Priority, parse_priority, priority_of_metadata

SHED = Priority.SHEDDABLE


def rejected(engine, reason: str) -> float:
    return engine.metrics.registry.get_sample_value(
        "batchproxy_rejected_requests_total", {"reason": reason})


def by_priority(engine, priority: str, code: str) -> float:
    return engine.metrics.registry.get_sample_value(
        "batchproxy_priority_requests_total", {"priority": priority, "code": code}) or 0.0


def submit(engine, value: float, priority: Priority = Priority.CRITICAL,
           timeout: float | None = None) -> asyncio.Future[bytes]:
    return asyncio.ensure_future(engine.submit(make_call([value]), timeout, priority=priority))


async def occupy(engine, rows: int = 4) -> asyncio.Future:
    """A full batch of critical calls that keeps the only replica busy for its cost."""
    busy = asyncio.gather(*(submit(engine, -1.0 - i) for i in range(rows)))
    await asyncio.sleep(0.001)
    return busy


def test_critical_rows_are_taken_before_older_sheddable_rows(vrun):
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4)
        busy = await occupy(engine)
        calls = [submit(engine, 10.0 + i, SHED) for i in range(4)]
        await asyncio.sleep(0.01)
        calls += [submit(engine, 20.0 + i) for i in range(4)]
        await asyncio.gather(busy, *calls)
        await engine.close()

    vrun(main())
    assert [s.values for s in replica.sent[1:]] == [
        [20.0, 21.0, 22.0, 23.0],  # the critical calls, though they came 10 ms later
        [10.0, 11.0, 12.0, 13.0],  # then the sheddable ones, still in arrival order
    ]


def test_sheddable_rows_fill_the_room_critical_rows_leave(vrun):
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4)
        busy = await occupy(engine)
        calls = [submit(engine, 10.0, SHED), submit(engine, 11.0, SHED)]
        await asyncio.sleep(0.01)
        calls += [submit(engine, 20.0), submit(engine, 21.0), submit(engine, 22.0)]
        answers = await asyncio.gather(busy, *calls)
        await engine.close()
        return answers[1:]

    answers = vrun(main())
    assert [answer_values(a) for a in answers] == [[10.0], [11.0], [20.0], [21.0], [22.0]]
    # One batch of four: three critical rows and the older sheddable row in the room left.
    assert [s.values for s in replica.sent[1:]] == [[20.0, 21.0, 22.0, 10.0], [11.0]]


def test_sheddable_calls_are_refused_first_as_the_queue_fills(vrun):
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, max_enqueued_rows=16)
        busy = await occupy(engine)
        queued = [submit(engine, float(i)) for i in range(8)]  # half the bound
        await asyncio.sleep(0)
        refused = submit(engine, 100.0, SHED)
        critical = submit(engine, 200.0)
        results = await asyncio.gather(refused, critical, return_exceptions=True)
        await asyncio.gather(busy, *queued)
        await engine.close()
        return engine, results

    engine, (refused, critical) = vrun(main())
    assert isinstance(refused, ProxyError)
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert "shed" in refused.message.lower()
    assert answer_values(critical) == [200.0]
    assert rejected(engine, "shed") == 1
    assert rejected(engine, "queue_full") == 0
    assert by_priority(engine, "sheddable", "UNAVAILABLE") == 1
    assert by_priority(engine, "critical", "OK") == 4 + 8 + 1


def test_a_critical_call_at_a_full_queue_evicts_the_newest_sheddable_call(vrun):
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, max_enqueued_rows=16)
        busy = await occupy(engine)
        calls = [submit(engine, float(i)) for i in range(6)]
        await asyncio.sleep(0.001)
        older, newer = submit(engine, 100.0, SHED), None
        await asyncio.sleep(0.001)
        newer = submit(engine, 101.0, SHED)
        await asyncio.sleep(0.001)
        calls += [submit(engine, 10.0 + i) for i in range(8)]  # 16 rows queued: full
        await asyncio.sleep(0)
        assert engine.queued_rows == 16
        arriving = submit(engine, 200.0)  # evicts `newer`, one row: enough
        # Three rows would need three sheddable rows evicted, and only one is left: this
        # call is refused and `older` keeps its place.
        too_big = asyncio.ensure_future(engine.submit(make_call([300.0, 301.0, 302.0])))
        results = await asyncio.gather(older, newer, arriving, too_big,
                                       return_exceptions=True)
        await asyncio.gather(busy, *calls)
        await engine.close()
        return engine, results

    engine, (older, newer, arriving, too_big) = vrun(main())
    assert isinstance(newer, ProxyError)
    assert newer.code == grpc.StatusCode.UNAVAILABLE
    assert "shed for a critical call" in newer.message
    assert answer_values(older) == [100.0]
    assert answer_values(arriving) == [200.0]
    assert isinstance(too_big, ProxyError) and too_big.code == grpc.StatusCode.UNAVAILABLE
    assert "full" in too_big.message
    assert rejected(engine, "shed") == 1
    assert rejected(engine, "queue_full") == 1
    assert engine.queued_rows == 0 and engine.admission.sheddable_rows == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sheddable_call_alone_is_served_as_a_critical_one_would_be(vrun, policy):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica}, batch_timeout_micros=2000, policy=policy)
        loop = asyncio.get_running_loop()
        answer = await engine.submit(make_call([7.0]), 1.0, priority=SHED)
        took = loop.time()
        await engine.close()
        return answer, took

    answer, took = vrun(main())
    assert answer_values(answer) == [7.0]
    # When a lone call leaves (fixed: its batch timeout), then the replica's cost.
    assert abs(took - (lone_call_sent_at(policy) + 0.1)) < 1e-9


def test_a_sheddable_call_is_not_starved_by_a_stream_of_critical_calls(vrun):
    # Critical calls arrive faster than the replica serves them, so a full batch of them is
    # always waiting; a sheddable call without a deadline ranks with them after a second.
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, max_enqueued_rows=400)
        loop = asyncio.get_running_loop()
        busy = await occupy(engine)
        stream = [submit(engine, float(i)) for i in range(8)]
        sheddable = submit(engine, 100.0, SHED)
        started = loop.time()
        answered: list[float] = []
        sheddable.add_done_callback(lambda _: answered.append(loop.time() - started))
        for i in range(100):  # 5 calls per 100 ms against 4 served
            await asyncio.sleep(0.02)
            stream.append(submit(engine, 1000.0 + i))
        answer = await sheddable
        (took,) = answered
        await asyncio.gather(busy, *stream)
        await engine.close()
        return answer, took

    answer, took = vrun(main())
    assert answer_values(answer) == [100.0]
    assert 1.0 <= took < 1.3  # promoted at 1 s, then in the next batch


@pytest.mark.parametrize(("value", "expected"), [
    (None, Priority.CRITICAL), ("", Priority.CRITICAL), ("critical", Priority.CRITICAL),
    ("Sheddable", Priority.SHEDDABLE), (b" sheddable ", Priority.SHEDDABLE)])
def test_priority_values(value, expected):
    assert parse_priority(value) is expected


def test_an_unknown_priority_is_invalid_argument():
    with pytest.raises(ProxyError) as caught:
        parse_priority("urgent")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "critical" in caught.value.message and "sheddable" in caught.value.message


def test_priority_from_grpc_metadata():
    assert priority_of_metadata(None) is Priority.CRITICAL
    assert priority_of_metadata([("x-other", "1")]) is Priority.CRITICAL
    assert priority_of_metadata([("x-batchproxy-priority", "sheddable")]) is SHED


def test_a_batch_full_only_with_sheddable_rows_waits_for_an_idle_replica(vrun):
    # Two batches may be in flight on the replica. Four critical rows go at once to the
    # second slot; four sheddable rows wait until the replica is idle, so critical calls
    # arriving meanwhile would still find room ahead of them. The fixed rule's (make_engine's):
    # the adaptive policy sends no batch to a busy replica that runs one at a time at all.
    replica = ScriptedReplica(cost_s=0.1, refuse_negative=False)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, max_inflight=2)
        busy = await occupy(engine)
        critical = [submit(engine, 10.0 + i) for i in range(4)]
        await asyncio.gather(busy, *critical)
        busy = await occupy(engine)
        sheddable = [submit(engine, 20.0 + i, SHED) for i in range(4)]
        await asyncio.gather(busy, *sheddable)
        await engine.close()

    vrun(main())
    starts = [(round(s.at, 3), s.values[0]) for s in replica.sent]
    assert starts[1] == (0.001, 10.0)  # critical: into the second slot at once
    assert starts[3][1] == 20.0 and starts[3][0] >= starts[2][0] + 0.1  # sheddable: idle
