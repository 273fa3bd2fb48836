"""Overload in virtual time: offered load five times what one replica can serve, and the
admission's wait estimate behind its refusals. The rules are exact here, free of the CPU
noise that a real-process run on two shared cores adds (that run, tests/test_overload.py,
checks only what holds on any machine)."""

from __future__ import annotations

import pytest
from scripted import ScriptedReplica, make_engine

from batchproxy.engine.policy import POLICIES
from batchproxy.sim import SimConfig, simulate

# One replica at 80 ms per batch of at most 8 rows: capacity 100 calls/s.
CAPACITY = 8 / 0.080


@pytest.mark.parametrize("policy", POLICIES)
def test_overload_refuses_the_excess_keeps_deadlines_and_the_replica_busy(policy):
    # Under either policy: the admission's wait estimate must count the batches the policy
    # keeps in flight (adaptive: one on this replica, not its two slots).
    report = simulate(SimConfig(
        replicas=1, batch_cost_ms=80, row_cost_us=0, max_batch_size=8,
        batch_timeout_micros=2000, rates=(5 * CAPACITY,), duration_s=20, deadline_ms=1000,
        slo_ms=1000, systems=(f"proxy:{policy}",), seed=1))
    (run,) = report.runs
    late = run.errors.get("DEADLINE_EXCEEDED", 0)
    refused = run.errors.get("UNAVAILABLE", 0)
    assert set(run.errors) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert run.ok + late + refused == run.requests  # every call answered
    assert refused > 0.5 * run.requests  # the excess is refused...
    assert late <= 0.03 * run.ok  # ...and what is admitted meets its deadline
    assert run.mean_utilization > 0.99  # while the replica never idles
    assert run.goodput_per_s > 0.95 * CAPACITY


@pytest.mark.parametrize(("policy", "expected_s"), [("fixed", 0.3), ("adaptive", 0.5)])
def test_the_expected_wait_counts_the_batches_the_policy_keeps_in_flight(vrun, policy,
                                                                       expected_s):
    # One replica, two slots, learned to run one batch at a time; four full batches ahead
    # of the call. The fixed rule fills both slots (a batch queued at the replica is timed
    # with its wait there): 4 / 2 + 1 batch times. Adaptive sends a batch only when the
    # replica can start it: 4 / 1 + 1.
    async def main():
        engine = make_engine({"a": ScriptedReplica()}, max_batch_size=4, max_inflight=2,
                             policy=policy)
        admission = engine.admission
        admission.note_service_time(0.1)
        admission.queued_rows = 16
        concurrency = engine.pool.replicas["a"].cost("m").concurrency
        wait = admission.expected_wait_s(1, model="m")
        admission.queued_rows = 0
        await engine.close()
        return concurrency, wait

    assert vrun(main()) == (1, pytest.approx(expected_s))
