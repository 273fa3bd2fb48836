"""Overload in virtual time: offered load five times what one replica can serve. The rules
are exact here, free of the CPU noise that a real-process run on two shared cores adds
(that run, tests/test_overload.py, checks only what holds on any machine)."""

from __future__ import annotations

from batchproxy.sim import SimConfig, simulate

# One replica at 80 ms per batch of at most 8 rows: capacity 100 calls/s.
CAPACITY = 8 / 0.080


def test_overload_refuses_the_excess_keeps_deadlines_and_the_replica_busy():
    report = simulate(SimConfig(
        replicas=1, batch_cost_ms=80, row_cost_us=0, max_batch_size=8,
        batch_timeout_micros=2000, rates=(5 * CAPACITY,), duration_s=20, deadline_ms=1000,
        slo_ms=1000, systems=("proxy",), seed=1))
    (run,) = report.runs
    late = run.errors.get("DEADLINE_EXCEEDED", 0)
    refused = run.errors.get("UNAVAILABLE", 0)
    assert set(run.errors) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert run.ok + late + refused == run.requests  # every call answered
    assert refused > 0.5 * run.requests  # the excess is refused...
    assert late <= 0.03 * run.ok  # ...and what is admitted meets its deadline
    assert run.mean_utilization > 0.99  # while the replica never idles
    assert run.goodput_per_s > 0.95 * CAPACITY
