"""The adaptive policy in virtual time: staggered starts, finish-time routing around a slow
replica, a backlog that earns the slow replica work, and full batches that never wait."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc
import pytest
from scripted import ScriptedReplica, answer_values, make_call, make_engine

from batchproxy.engine import policy
from batchproxy.errors import ProxyError
from batchproxy.fleet import costs


def steady(engine, calls: int, every_s: float):
    async def run():
        tasks = []
        for _ in range(calls):
            tasks.append(asyncio.ensure_future(engine.submit(make_call(1))))
            await asyncio.sleep(every_s)
        return await asyncio.gather(*tasks)
    return run()


def starts_after(replicas: dict[str, ScriptedReplica], warm_s: float):
    return sorted((s.at, name, s.rows) for name, r in replicas.items() for s in r.sent
                  if s.at > warm_s)


def test_batch_starts_are_spaced_one_batch_time_over_the_replicas(vrun):
    # 4 replicas at 100 ms a batch, one call every 2 ms: once costs are learned, a batch
    # leaves every 25 ms, the replicas take turns, and each starts the moment it is free.
    replicas = {name: ScriptedReplica(cost_s=0.1) for name in "abcd"}

    async def main():
        engine = make_engine(replicas, max_batch_size=32, max_inflight=2,
                             max_enqueued_rows=640, policy="adaptive")
        await steady(engine, 1500, 0.002)
        await engine.close()

    vrun(main())
    starts = [s for s in starts_after(replicas, 1.0) if s[0] < 2.9]  # before arrivals end
    gaps = {round(b[0] - a[0], 9) for a, b in itertools.pairwise(starts)}
    assert gaps == {0.025}
    assert [name for _, name, _ in starts[:8]] == list("abcdabcd")
    assert all(12 <= rows <= 13 for _, _, rows in starts)


def test_a_slow_replica_gets_no_work_a_fast_one_finishes_sooner(vrun):
    replicas = {"fast": ScriptedReplica(cost_s=0.1), "slow": ScriptedReplica(cost_s=0.3)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=2,
                             policy="adaptive")
        answers = await steady(engine, 100, 0.05)
        await engine.close()
        return answers

    answers = vrun(main())
    assert all(answer_values(a) == [0.0] for a in answers)
    assert not [s for s in replicas["slow"].sent if s.at > 1.0]


def shares_after_a_second(vrun, replicas: dict[str, ScriptedReplica], every_s: float
                          ) -> dict[str, int]:
    """Batches each replica got after the first second of one-row calls `every_s` apart."""
    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=2,
                             policy="adaptive")
        await steady(engine, 4000, every_s)
        await engine.close()

    vrun(main())
    return {name: sum(1 for s in r.sent if s.at > 1.0) for name, r in replicas.items()}


def test_a_replica_not_yet_timed_is_judged_by_its_peers_not_the_prior(vrun):
    # Both replicas take 2 ms, five times faster than the prior's guess. Once one of them
    # is timed, the other must not look slower than it for good: when the timed one is
    # busy, the other finishes first, and both keep taking batches.
    late = shares_after_a_second(
        vrun, {name: ScriptedReplica(cost_s=0.002) for name in "ab"}, 0.0005)
    assert min(late.values()) >= 0.3 * sum(late.values()), late


def test_a_replica_whose_first_batch_was_slow_is_not_judged_by_it(vrun):
    # b's first batch pays for its model's lazy set-up (10 ms, as a real replica's did);
    # every later one takes 2 ms, as on a. Judged by that first time, b would look five
    # times slower than a and never finish a batch first again.
    late = shares_after_a_second(
        vrun, {"a": ScriptedReplica(cost_s=0.002),
               "b": ScriptedReplica(cost_s=0.002, first_cost_s=0.01)}, 0.001)
    assert min(late.values()) >= 0.3 * sum(late.values()), late


def timed_steady(engine, calls: int, every_s: float):
    """`steady`, returning each call's (submitted at, seconds to its answer or error)."""
    async def one(loop):
        started = loop.time()
        with contextlib.suppress(ProxyError):  # refused when the queue is full
            await engine.submit(make_call(1))
        return started, loop.time() - started

    async def run():
        loop = asyncio.get_running_loop()
        tasks = []
        for _ in range(calls):
            tasks.append(asyncio.ensure_future(one(loop)))
            await asyncio.sleep(every_s)
        return await asyncio.gather(*tasks)
    return run()


def test_a_replica_that_runs_batches_side_by_side_is_found_out_and_used(vrun):
    # 120 rows/s on a replica that takes 100 ms for a batch of up to 8 however many run at
    # once: one at a time it answers 80 rows/s, and the queue grows for good. Probed with a
    # batch beside another while rows back up, it is found to run several at once.
    replicas = {"gpu": ScriptedReplica(cost_s=0.1)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=4,
                             max_enqueued_rows=400, policy="adaptive")
        timed = await timed_steady(engine, 480, 1 / 120)
        concurrency = engine.pool.replicas["gpu"].cost("m").concurrency
        await engine.close()
        return timed, concurrency

    timed, concurrency = vrun(main())
    assert concurrency >= 2
    assert max(took for at, took in timed if at > 2.0) < 0.3


def test_a_replica_that_runs_one_batch_at_a_time_is_probed_a_few_times_only(vrun):
    # The same load on a replica that runs one batch at a time: the probes find it slower
    # beside another batch, and no more are sent. (In virtual time the proxy's turn costs
    # nothing, so no batch is sent early to hide it: every batch that waited is a probe.)
    replicas = {"serial": ScriptedReplica(cost_s=0.1, serial=True)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=4,
                             max_enqueued_rows=400, policy="adaptive")
        await timed_steady(engine, 480, 1 / 120)
        concurrency = engine.pool.replicas["serial"].cost("m").concurrency
        await engine.close()
        return concurrency

    assert vrun(main()) == 1
    probes = [at for at, waited in replicas["serial"].waited
              if waited > 1e-9]
    assert 4 <= len(probes) <= 5, probes  # costs.JUDGED_AFTER, and one more in flight
    assert max(probes) < 1.5


def test_a_replica_judged_serial_that_gains_room_later_is_found_out(vrun, monkeypatch):
    # The same load on a replica that runs one batch at a time for its first 2 s and then
    # several: its concurrency, judged 1, is tried again (here after 10 batches, to keep
    # the test short) and found, and the backlog built meanwhile drains.
    monkeypatch.setattr(costs, "REJUDGE_AFTER", 10)
    replicas = {"gpu": ScriptedReplica(cost_s=0.1, serial=True)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=4,
                             max_enqueued_rows=400, policy="adaptive")
        asyncio.get_running_loop().call_later(2.0, setattr, replicas["gpu"], "serial", False)
        cost = engine.pool.replicas["gpu"].cost("m")
        run = asyncio.ensure_future(timed_steady(engine, 960, 1 / 120))
        await asyncio.sleep(1.9)
        judged_before = cost.concurrency
        timed = await run
        await engine.close()
        return judged_before, cost.concurrency, timed

    judged_before, concurrency, timed = vrun(main())
    assert judged_before == 1
    assert concurrency >= 2
    assert max(took for at, took in timed if at > 6.0) < 0.3


def test_a_backlog_earns_the_slow_replica_the_batches_it_can_finish_first(vrun):
    # Fast: 4 rows per 100 ms (40/s); slow: 4 rows per 300 ms (13/s), each one batch at a
    # time. 45 calls/s need both, and every call is still answered in bounded time.
    replicas = {"fast": ScriptedReplica(cost_s=0.1, serial=True),
                "slow": ScriptedReplica(cost_s=0.3, serial=True)}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=2,
                             max_enqueued_rows=400, policy="adaptive")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await steady(engine, 450, 1 / 45)
        took = loop.time() - started
        await engine.close()
        return took

    took = vrun(main())
    assert len(replicas["slow"].sent) > 10
    assert took < 10 + 1.0  # 10 s of arrivals, then the queue is worked off at once


def test_a_full_batch_leaves_at_once_whatever_the_spacing(vrun):
    replicas = {name: ScriptedReplica(cost_s=0.1) for name in "ab"}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=2,
                             policy="adaptive")
        first = [asyncio.ensure_future(engine.submit(make_call(1))) for _ in range(4)]
        await asyncio.sleep(0.001)
        await asyncio.gather(*first, *(engine.submit(make_call(1)) for _ in range(4)))
        await engine.close()

    vrun(main())
    # The second batch is full 1 ms after the first: it goes to the idle replica at once,
    # although the spacing alone would hold it for 50 ms.
    assert sorted((s.at, s.rows) for r in replicas.values() for s in r.sent) == [
        (0.0, 4), (0.001, 4)]


class SteadyTurn:
    """A stand-in for the proxy's measured turn (fleet/turn.py): on the virtual clock the
    loop costs no time, so a test that needs a turn sets one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def answered(self, now: float) -> None:
        pass

    looked = sending = answered


def _full_batch_behind_a_busy_replica(vrun, turn_s: float | None, trip_s: float = 0.0):
    """A full batch that finds the one replica busy until 0.1 s after the batch before it
    left. Returns when each full batch left, when the last one to wait at the replica
    arrived and how long it waited, and the time each full batch is learned to have taken
    (each after its own answer)."""
    replicas = {"only": ScriptedReplica(cost_s=0.1, serial=True)}
    timed: list[float] = []  # what each full batch is learned to have taken

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=2, policy="adaptive")
        if turn_s is not None:
            engine.pool.turn = SteadyTurn(turn_s)
        for endpoint in engine.pool.replicas.values():
            endpoint.trip_s = trip_s  # as its health checks would time it
        note_answered = engine.pool.note_answered

        def timing(replica, model, rows, seconds, beside, *expected):
            if rows == 4 and seconds is not None:
                timed.append(seconds)
            note_answered(replica, model, rows, seconds, beside, *expected)

        engine.pool.note_answered = timing
        await steady(engine, 12, 0.15)  # 12 batches of one: the fit is warm
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(engine.submit(make_call(4)))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, engine.submit(make_call(4)))
        for _ in range(8):  # more full batches, each sent to wait behind the one before
            await asyncio.gather(*(engine.submit(make_call(4)) for _ in range(2)))
        await engine.close()
        return started

    started = vrun(main())
    full = [round(s.at - started, 9) for s in replicas["only"].sent if s.rows == 4]
    waited = [(round(at - started, 9), wait) for at, wait in replicas["only"].waited]
    return full, waited, timed


@pytest.mark.parametrize("turn_s, trip_s", [(0.004, 0.0), (0.0, 0.004), (0.001, 0.003)])
def test_a_batch_leaves_for_a_busy_replica_within_the_lead_and_waits_there(
        vrun, turn_s, trip_s):
    # The proxy's loop takes `turn_s` to turn from an answer to the next send, and a call
    # takes `trip_s` there and back: the full batch waits in the proxy until 1.5 times the
    # two before the replica frees (so its rows are not fixed early, nor the slot taken),
    # then goes to wait at the replica, so that the replica does not idle through them.
    full, waited, timed = _full_batch_behind_a_busy_replica(vrun, turn_s, trip_s)
    lead = policy.TURN_MARGIN * 0.004
    assert full[:2] == [0.0, round(0.1 - lead, 9)]
    # Waiting there, it started the moment the one before ended.
    assert waited[0] == (round(0.1 - lead, 9), pytest.approx(lead))
    # Timed from the answer it waited behind, not from its send: the fit learns the
    # replica's own 100 ms, and the lead is not undone by a slower replica learned.
    assert sum(wait == pytest.approx(lead) for _, wait in waited) >= 8
    assert len(timed) >= 10
    assert all(took == pytest.approx(0.1) for took in timed), timed


def test_the_lead_is_at_most_a_share_of_a_batch():
    cost = costs.CostModel()
    cost.first_seen = True
    for _ in range(costs.WARM):
        cost.observe(1, 0.1)
    assert policy.lead_s(cost, 0.002, 0.004) == pytest.approx(policy.TURN_MARGIN * 0.006)
    assert policy.lead_s(cost, 0.05, 0.05) == pytest.approx(policy.PIPELINE_SHARE * 0.1)


def test_where_the_turn_costs_nothing_no_batch_is_sent_early(vrun):
    # The same on the virtual clock's own (zero) turn: the batch leaves the moment the
    # replica frees, with every row it could gather, and nothing waits at the replica.
    full, waited, _ = _full_batch_behind_a_busy_replica(vrun, None)
    assert full[:2] == [0.0, 0.1]
    # (Later pairs of full batches back up: a probe of a second batch beside the first
    # may wait a whole batch, but never a lead.)
    assert all(wait > 0.05 for _, wait in waited), waited


def _late_call_after_a_full_batch(vrun, policy: str, timeout_s: float):
    """Warm the costs, occupy the one replica with a full batch, then submit a call whose
    deadline admission accepts (nothing is queued) but that must wait for the replica."""
    replicas = {"only": ScriptedReplica(cost_s=0.1)}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=1, policy=policy)
        await steady(engine, 12, 0.15)  # 12 batches of one: the fit is warm
        loop = asyncio.get_running_loop()
        full = asyncio.ensure_future(engine.submit(make_call(4)))
        await asyncio.sleep(0.01)
        started = loop.time()
        try:
            result = await engine.submit(make_call([7.0]), timeout_s)
        except Exception as err:  # the test looks at the error itself
            result = err
        took = loop.time() - started
        await full
        await engine.close()
        return took, result

    took, result = vrun(main())
    sent_tagged = [s for s in replicas["only"].sent if 7.0 in s.values]
    return took, result, sent_tagged


def test_a_call_its_replica_cannot_answer_in_time_is_refused_when_its_batch_forms(vrun):
    # The replica frees 90 ms after the call arrives and needs 100 ms: a 150 ms deadline
    # cannot be met, so the call is refused then (UNAVAILABLE), never sent.
    took, result, sent = _late_call_after_a_full_batch(vrun, "adaptive", 0.15)
    assert isinstance(result, ProxyError)
    assert result.code is grpc.StatusCode.UNAVAILABLE
    assert "within its deadline" in result.message
    assert abs(took - 0.09) < 1e-6
    assert sent == []


def test_the_fixed_policy_sends_the_same_call_to_be_late(vrun):
    took, result, sent = _late_call_after_a_full_batch(vrun, "fixed", 0.15)
    assert isinstance(result, ProxyError)
    assert result.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert abs(took - 0.15) < 1e-6
    assert len(sent) == 1


def test_a_call_that_can_make_its_deadline_waits_for_the_busy_replica(vrun):
    took, result, sent = _late_call_after_a_full_batch(vrun, "adaptive", 0.3)
    assert answer_values(result) == [7.0]
    assert abs(took - 0.19) < 1e-3
    assert len(sent) == 1


def test_a_fleet_too_large_to_scan_is_sampled_and_still_spreads_the_load(vrun):
    # 100 replicas at 100 ms a batch of 8 (8000 rows/s), 1000 calls/s for 2 s: each decision
    # weighs 2 idle and 2 busy replicas, yet every call is answered within about two
    # batch times and the batches reach most of the fleet.
    from batchproxy.engine.policy import SAMPLED_REPLICAS, AdaptivePolicy

    replicas = {f"r{i}": ScriptedReplica(cost_s=0.1) for i in range(100)}
    waits: list[float] = []

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=1,
                             max_enqueued_rows=4000, policy="adaptive")
        policy = engine.scheduler.policy
        assert isinstance(policy, AdaptivePolicy)
        weighed, weight = policy._candidates("m")
        assert len(weighed) == SAMPLED_REPLICAS and weight == 50.0  # all idle at first
        loop = asyncio.get_running_loop()

        async def one():
            started = loop.time()
            await engine.submit(make_call(1))
            waits.append(loop.time() - started)

        tasks = []
        for _ in range(2000):
            tasks.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        await engine.close()

    vrun(main())
    assert len(waits) == 2000
    assert max(waits) < 0.25
    assert sum(1 for r in replicas.values() if r.sent) > 50
