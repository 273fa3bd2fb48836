"""Hedging in virtual time: a batch overdue on a hung or degraded replica is sent again to
another, the first answer is delivered and the other call cancelled with its slot released;
the budget bounds how many batches are hedged; nothing is hedged that answers in time, or
with the budget at 0."""

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

from batchproxy.config import BatchingConfig
from batchproxy.engine.hedging import BURST, FLOOR_PER_S, HedgeBudget, overdue_after
from batchproxy.errors import ProxyError
from batchproxy.fleet.costs import WARM, CostModel
from batchproxy.metrics import HEDGE_OUTCOMES

# Every replica has learned a cost of 0.1 s a batch: a batch is overdue after 0.3 s.
LEARNED_S = 0.1
OVERDUE_S = 0.3


@pytest.fixture(params=POLICIES)
def policy(request) -> str:
    """Hedging works on a batch once sent, whichever policy sent it: each test runs under
    both, its times counted from when the policy sends the lone call."""
    return request.param


def learned(engine, cost_s: float = LEARNED_S) -> None:
    for replica in engine.pool.replicas.values():
        for _ in range(WARM):
            replica.cost("m").observe(1, cost_s)


def hedges(engine) -> dict[str, float]:
    return {outcome: engine.metrics.registry.get_sample_value(
        "batchproxy_hedged_batches_total", {"outcome": outcome}) for outcome in HEDGE_OUTCOMES}


async def outcome(coro):
    try:
        return await coro
    except ProxyError as err:
        return err


async def first_batch_to_a(engine, coro):
    """Submit with replica b busy, so the batch goes to a; b frees 10 ms later."""
    b = engine.pool.replicas["b"]
    b.outstanding = 1
    call = asyncio.ensure_future(coro)
    await asyncio.sleep(0.01)
    engine.pool.release(b)
    return await call


def test_a_batch_on_a_hung_replica_is_answered_by_the_hedge(vrun, policy):
    hung = ScriptedReplica(hung=True)
    healthy = ScriptedReplica(cost_s=LEARNED_S)

    async def main():
        engine = make_engine({"a": hung, "b": healthy}, hedge_budget_percent=5, policy=policy)
        learned(engine)
        loop = asyncio.get_running_loop()
        answer = await first_batch_to_a(engine, engine.submit(make_call([3.0]), timeout=2.0))
        answered_at = loop.time()
        a = engine.pool.replicas["a"]
        state = a.outstanding, a.consecutive_failures, hedges(engine)
        await engine.close()
        return answer, answered_at, state

    answer, answered_at, (outstanding, failures, counts) = vrun(main())
    assert answer_values(answer) == [3.0]
    # Sent to a at 2 ms (the fixed rule's batch timeout; adaptive: at once), overdue
    # 300 ms later, answered 100 ms after that.
    sent = lone_call_sent_at(policy)
    (first,) = hung.sent
    (hedge,) = healthy.sent
    assert abs(first.at - sent) < 1e-9
    assert abs(hedge.at - (sent + OVERDUE_S)) < 1e-9
    assert abs(hedge.timeout - (2.0 - sent - OVERDUE_S)) < 1e-9  # the caller's own time left
    assert abs(answered_at - (sent + OVERDUE_S + LEARNED_S)) < 1e-9
    assert outstanding == 0  # the loser's slot is released
    assert failures == 1  # losing by that much counts against the replica
    assert counts == {**dict.fromkeys(HEDGE_OUTCOMES, 0.0), "won": 1.0}


def test_the_first_call_answering_first_cancels_the_hedge_and_frees_its_slot(vrun, policy):
    degraded = ScriptedReplica(cost_s=0.35)  # overdue at 0.3 s, answers at 0.35 s
    healthy = ScriptedReplica(cost_s=LEARNED_S)

    async def main():
        engine = make_engine({"a": degraded, "b": healthy}, hedge_budget_percent=5,
                             policy=policy)
        learned(engine)
        loop = asyncio.get_running_loop()
        answer = await first_batch_to_a(engine, engine.submit(make_call([4.0])))
        answered_at = loop.time()
        pool = engine.pool
        state = (pool.replicas["a"].outstanding, pool.replicas["b"].outstanding,
                 hedges(engine))
        await engine.close()
        return answer, answered_at, state

    answer, answered_at, (a_outstanding, b_outstanding, counts) = vrun(main())
    assert answer_values(answer) == [4.0]
    assert abs(answered_at - (lone_call_sent_at(policy) + 0.35)) < 1e-9
    assert len(healthy.sent) == 1  # the hedge left, and was cancelled
    assert a_outstanding == 0 and b_outstanding == 0
    assert counts["lost"] == 1.0 and counts["won"] == 0.0


def test_a_replica_answering_in_time_is_not_hedged(vrun, policy):
    replica = ScriptedReplica(cost_s=0.25)  # slower than learned, but not overdue
    spare = ScriptedReplica(cost_s=LEARNED_S)

    async def main():
        engine = make_engine({"a": replica, "b": spare}, hedge_budget_percent=5,
                             policy=policy)
        learned(engine)
        loop = asyncio.get_running_loop()
        answer = await first_batch_to_a(engine, engine.submit(make_call([5.0])))
        answered_at = loop.time()
        counts = hedges(engine)
        await engine.close()
        return answer, answered_at, counts

    answer, answered_at, counts = vrun(main())
    assert answer_values(answer) == [5.0]
    assert abs(answered_at - (lone_call_sent_at(policy) + 0.25)) < 1e-9
    assert not spare.sent
    assert set(counts.values()) == {0.0}


@pytest.mark.parametrize("settings", [{"hedge_budget_percent": 0, "policy": "adaptive"},
                                      {"hedge_budget_percent": 0, "policy": "fixed"},
                                      {"policy": "fixed"}])  # off by default with fixed
def test_hedging_off_leaves_a_hung_batch_to_the_replica_timeout_and_retry(vrun, settings):
    hung = ScriptedReplica(hung=True)
    healthy = ScriptedReplica(cost_s=LEARNED_S)

    async def main():
        engine = make_engine({"a": hung, "b": healthy}, default_timeout_s=1.0, **settings)
        learned(engine)
        loop = asyncio.get_running_loop()
        answer = await first_batch_to_a(engine, engine.submit(make_call([6.0])))
        answered_at = loop.time()
        counts = hedges(engine)
        await engine.close()
        return answer, answered_at, counts

    answer, answered_at, counts = vrun(main())
    assert answer_values(answer) == [6.0]
    (retry,) = healthy.sent
    sent = lone_call_sent_at(settings["policy"])
    assert abs(retry.at - (sent + 1.0)) < 1e-9  # as before hedging: the replica timeout, retry
    assert abs(answered_at - (sent + 1.1)) < 1e-9
    assert set(counts.values()) == {0.0}


def test_hedging_is_on_by_default_with_the_adaptive_policy_only():
    assert BatchingConfig(policy="adaptive").hedge_percent == 5.0
    assert BatchingConfig(policy="fixed").hedge_percent == 0.0
    assert BatchingConfig(policy="adaptive", hedge_budget_percent=0).hedge_percent == 0.0
    assert BatchingConfig(hedge_budget_percent=2.5).hedge_percent == 2.5
    with pytest.raises(ValueError):
        BatchingConfig(hedge_budget_percent=-1)


def test_the_budget_caps_hedges_at_five_percent_of_batches_plus_the_floor(vrun, policy):
    # One hung replica of four under steady traffic: every batch it takes is overdue. Only
    # the budget's share is hedged; the rest wait for the replica timeout and are retried.
    # Every caller is answered once, with its own rows.
    hung = ScriptedReplica(hung=True)
    fleet = {"a": hung, **{name: ScriptedReplica(cost_s=0.01) for name in "bcd"}}
    calls = 400

    async def main():
        engine = make_engine(fleet, max_batch_size=1, max_inflight=4, default_timeout_s=1.0,
                             max_enqueued_rows=calls, hedge_budget_percent=5, policy=policy)
        engine.pool.eject_after_failures = 10**6  # keep the hung replica in the fleet
        learned(engine, 0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = []
        for i in range(calls):
            pending.append(asyncio.ensure_future(outcome(engine.submit(make_call([i])))))
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(*pending)
        elapsed = loop.time() - started
        counts = hedges(engine)
        await engine.close()
        return answers, elapsed, counts

    answers, elapsed, counts = vrun(main())
    assert [answer_values(a) for a in answers] == [[float(i)] for i in range(calls)]
    sent = sum(len(replica.sent) for replica in fleet.values())
    hedged = counts["won"] + counts["lost"] + counts["failed"]
    assert hedged >= 1
    assert hedged <= BURST + 0.05 * sent + FLOOR_PER_S * elapsed
    assert counts["budget_exceeded"] > 0  # the budget, not the traffic, was the limit


def test_the_budget_refills_per_batch_and_per_second_and_saves_only_a_burst():
    budget = HedgeBudget(5, floor_per_s=1.0, burst=3.0)
    for _ in range(3):
        assert budget.available(0.0)
        budget.spend(0.0)
    assert not budget.available(0.0)
    for _ in range(20):  # 20 batches at 5 % are one hedge
        budget.note_sent()
    assert budget.available(0.0)
    budget.spend(0.0)
    assert not budget.available(0.5)
    assert budget.available(1.0)  # the floor: one a second
    assert budget.tokens <= 3.0
    budget.available(100.0)
    assert budget.tokens == 3.0  # a quiet hour saves no more than the burst
    assert not HedgeBudget(0).enabled


def test_a_batch_is_overdue_after_three_times_its_expected_time_with_a_floor():
    cost = CostModel()
    for _ in range(WARM):
        cost.observe(1, 0.1)
    assert overdue_after(cost, 1, 0) == pytest.approx(0.3)
    assert overdue_after(cost, 1, 1) == pytest.approx(0.6)  # waits behind one batch first
    fast = CostModel()
    for _ in range(WARM):
        fast.observe(1, 0.002)
    assert overdue_after(fast, 1, 0) == pytest.approx(0.027)


def test_a_hedge_failing_leaves_the_first_call_to_answer(vrun, policy):
    slow = ScriptedReplica(cost_s=0.5)
    failing = ScriptedReplica(error=ProxyError(grpc.StatusCode.UNAVAILABLE, "refused"))

    async def main():
        engine = make_engine({"a": slow, "b": failing}, hedge_budget_percent=5, policy=policy)
        learned(engine)
        loop = asyncio.get_running_loop()
        answer = await first_batch_to_a(engine, engine.submit(make_call([7.0])))
        answered_at = loop.time()
        counts = hedges(engine)
        outstanding = engine.pool.replicas["b"].outstanding
        await engine.close()
        return answer, answered_at, counts, outstanding

    answer, answered_at, counts, outstanding = vrun(main())
    assert answer_values(answer) == [7.0]
    assert abs(answered_at - (lone_call_sent_at(policy) + 0.5)) < 1e-9
    assert counts["failed"] == 1.0 and outstanding == 0


def test_the_flag_reaches_serve_and_the_simulator_alike():
    from batchproxy.cli import build_parser, proxy_config
    from batchproxy.sim.cli import sim_config

    parser = build_parser()
    serve = proxy_config(parser.parse_args(["serve", "--batching_policy", "adaptive"]))
    assert serve.batching.hedge_percent == 5.0
    serve = proxy_config(parser.parse_args(["serve", "--hedge_budget_percent", "0",
                                            "--batching_policy", "adaptive"]))
    assert serve.batching.hedge_percent == 0.0
    simulated = sim_config(parser.parse_args(["simulate", "--hedge_budget_percent", "2"]))
    assert simulated.hedge_budget_percent == 2.0
