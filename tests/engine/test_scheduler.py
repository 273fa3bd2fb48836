"""The scheduler's flush timing, exact in virtual time: when rows leave, in what batches."""

from __future__ import annotations

import asyncio

import grpc
from scripted import ScriptedReplica, answer_values, make_call, make_engine

from batchproxy.errors import ProxyError


def test_a_partial_batch_leaves_at_its_due_time(vrun):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica}, batch_timeout_micros=2000)
        answer = await engine.submit(make_call(1))
        await engine.close()
        return answer

    assert answer_values(vrun(main())) == [0.0]
    assert [(s.at, s.rows) for s in replica.sent] == [(0.002, 1)]


def test_a_full_batch_leaves_at_once(vrun):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, batch_timeout_micros=50_000)
        await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(4)))
        await engine.close()

    vrun(main())
    assert [(s.at, s.rows) for s in replica.sent] == [(0.0, 4)]


def test_rows_left_after_a_full_batch_leave_at_their_own_due_time(vrun):
    # Two replicas costing 300 ms, max batch 4, timeout 2 ms: a 1-row call, a 4-row call,
    # then a 1-row call 0.5 ms later. The left-over row and the last call leave together at
    # the 4-row call's due time, on the idle second replica: one replica call, not two.
    replicas = {"a": ScriptedReplica(cost_s=0.3), "b": ScriptedReplica(cost_s=0.3)}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, batch_timeout_micros=2000)
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(engine.submit(make_call(1)))
        second = asyncio.ensure_future(engine.submit(make_call(4)))
        await asyncio.sleep(0.0005)
        last = await engine.submit(make_call(1))
        answered_last = loop.time()
        await asyncio.gather(first, second)
        answered_all = loop.time()
        await engine.close()
        return last, answered_last, answered_all

    last, answered_last, answered_all = vrun(main())
    assert answer_values(last) == [0.0]
    assert abs(answered_last - 0.302) < 1e-9
    assert abs(answered_all - 0.302) < 1e-9
    sent = sorted((s.at, s.rows) for r in replicas.values() for s in r.sent)
    assert sent == [(0.0, 4), (0.002, 2)]


def test_a_due_partial_batch_leaves_the_moment_a_replica_frees(vrun):
    replica = ScriptedReplica(cost_s=0.3)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, batch_timeout_micros=2000)
        full = asyncio.ensure_future(engine.submit(make_call(4)))
        await asyncio.sleep(0.01)
        partial = await engine.submit(make_call(1))
        await full
        await engine.close()
        return partial

    vrun(main())
    assert [(s.at, s.rows) for s in replica.sent] == [(0.0, 4), (0.3, 1)]


def test_a_call_larger_than_a_batch_is_cut_and_joined_in_order(vrun):
    replica = ScriptedReplica(cost_s=0.01)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, max_inflight=2)
        answer = await engine.submit(make_call(10))
        await engine.close()
        return answer

    assert answer_values(vrun(main())) == [float(i) for i in range(10)]
    assert sorted(s.rows for s in replica.sent) == [2, 4, 4]


def test_a_tight_deadline_is_admitted_on_an_empty_queue(vrun):
    # Once a batch has been timed, admission estimates waits; with nothing queued the
    # expected wait is 0 and a deadline as short as the batch timeout is admitted.
    replica = ScriptedReplica(cost_s=0.001)

    async def main():
        engine = make_engine({"a": replica}, batch_timeout_micros=2000)
        await engine.submit(make_call(1))
        answer = await engine.submit(make_call(1), timeout=0.0035)
        await engine.close()
        return answer

    assert answer_values(vrun(main())) == [0.0]


def test_queued_bytes_are_bounded_and_return_to_zero(vrun):
    replica = ScriptedReplica(cost_s=0.1)
    row_bytes = 4  # one float per row

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, batch_timeout_micros=50_000,
                             max_enqueued_bytes=3 * row_bytes)
        first = asyncio.ensure_future(engine.submit(make_call(3)))
        await asyncio.sleep(0)
        assert engine.queued_bytes == 3 * row_bytes
        try:
            await engine.submit(make_call(1))
        except ProxyError as err:
            refused = err
        await first
        counts = engine.queued_rows, engine.queued_bytes
        await engine.close()
        return refused, counts

    refused, counts = vrun(main())
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert "bytes queued" in refused.message
    assert counts == (0, 0)


def test_an_expired_call_leaves_the_queue_and_its_rows_are_never_sent(vrun):
    replica = ScriptedReplica(cost_s=0.3)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=4, batch_timeout_micros=2000)
        busy = asyncio.ensure_future(engine.submit(make_call(4)))
        await asyncio.sleep(0.001)
        try:
            await engine.submit(make_call(1), timeout=0.1)
        except ProxyError as err:
            expired = err
        await busy
        await asyncio.sleep(0.5)
        await engine.close()
        return expired, engine.queued_rows

    expired, queued = vrun(main())
    assert expired.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert queued == 0
    assert [s.rows for s in replica.sent] == [4]


def test_a_full_queue_answers_unavailable_at_once(vrun):
    # One batch in flight, two batches' worth of rows queued (max_enqueued_rows 4): the
    # next calls are refused at the moment they arrive, not after waiting.
    replica = ScriptedReplica(cost_s=0.4)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=2, batch_timeout_micros=0,
                             max_enqueued_rows=4)
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(engine.submit(make_call(2)))
        await asyncio.sleep(0.1)  # the first batch is now at the replica
        queued = [asyncio.ensure_future(engine.submit(make_call(2))) for _ in range(2)]
        await asyncio.sleep(0)
        refused_at = []
        for _ in range(4):
            try:
                await engine.submit(make_call(2))
            except ProxyError as err:
                assert err.code is grpc.StatusCode.UNAVAILABLE and "queue" in err.message
                refused_at.append(loop.time())
        await asyncio.gather(first, *queued)
        await engine.close()
        return refused_at

    assert vrun(main()) == [0.1] * 4
    assert [s.rows for s in replica.sent] == [2, 2, 2]


def test_a_latency_objective_refuses_at_once_what_the_queue_would_keep_past_it(vrun):
    # One replica at 100 ms a batch of 4, 12 rows queued behind a batch in flight: a new
    # call would wait about 400 ms. With a 200 ms objective it is refused on arrival (and
    # says why); without one, the same call (no deadline) is admitted and answered.
    async def main(slo_ms: float):
        replica = ScriptedReplica(cost_s=0.1)
        engine = make_engine({"a": replica}, max_batch_size=4, batch_timeout_micros=0,
                             latency_slo_ms=slo_ms)
        # Admitted before any batch was timed (no estimate yet, so nothing is refused).
        queued = [asyncio.ensure_future(engine.submit(make_call(4))) for _ in range(5)]
        await asyncio.sleep(0.15)  # the first batch was answered at 0.1: now it estimates
        try:
            result = await engine.submit(make_call(1))
        except ProxyError as err:
            result = err
        await asyncio.gather(*queued)
        await engine.close()
        return result

    refused = vrun(main(200))
    assert isinstance(refused, ProxyError)
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert "latency objective" in refused.message
    assert answer_values(vrun(main(0))) == [0.0]
