"""The baselines on tiny scripted workloads, where every time is known exactly."""

from __future__ import annotations

from batchproxy.sim.baselines import DirectSystem, TfsSystem
from batchproxy.sim.clock import run_virtual
from batchproxy.sim.replicas import Cost, SimReplica
from batchproxy.sim.simulate import drive
from batchproxy.sim.workloads import Arrival, Shape

COST = Cost(0.010, 0.001)  # 10 ms a batch + 1 ms a row
SHAPES = [Shape("m", rows, b"") for rows in range(5)]  # shape i has i rows
OTHER = Shape("n", 1, b"")  # another model


def replicas(count: int = 1, concurrency: int = 1) -> list[SimReplica]:
    return [SimReplica(f"r{i}", i, {}, COST, concurrency=concurrency) for i in range(count)]


def run(system, script: list[tuple[float, int, float | None]]):
    """Each (time, shape, deadline) offered to `system` in order; (latency, code) of each."""
    outcomes = run_virtual(drive(system, [Arrival(*s) for s in script]))
    return [(round(lat, 9), code)
            for lat, code in zip(outcomes.latencies_s, outcomes.codes, strict=True)]


def tfs(reps: list[SimReplica], max_batch: int = 4, timeout_s: float = 0.002,
        max_batches: int = 10, shapes=SHAPES) -> TfsSystem:
    return TfsSystem(reps, shapes, max_batch, timeout_s, max_batches)


def test_direct_round_robin_queues_at_each_replica():
    reps = replicas(2)
    out = run(DirectSystem(reps, SHAPES), [(0.0, 1, None)] * 4)
    # Calls 0 and 2 go to replica 0, 1 and 3 to replica 1: 11 ms each, one at a time.
    assert out == [(0.011, "OK"), (0.011, "OK"), (0.022, "OK"), (0.022, "OK")]
    assert [dict(r.record.batch_rows) for r in reps] == [{1: 2}, {1: 2}]


def test_direct_deadline():
    out = run(DirectSystem(replicas(1), SHAPES), [(0.0, 1, None), (0.0, 1, 0.015)])
    assert out == [(0.011, "OK"), (0.015, "DEADLINE_EXCEEDED")]


def test_tfs_a_full_batch_closes_at_once():
    reps = replicas()
    out = run(tfs(reps), [(0.0, 2, None), (0.0005, 2, None)])
    # Full (4 rows) at 0.5 ms: it runs at once, 14 ms, no batch timeout waited.
    assert out == [(0.0145, "OK"), (0.014, "OK")]
    assert dict(reps[0].record.batch_rows) == {4: 1}


def test_tfs_a_partial_batch_waits_the_timeout():
    reps = replicas()
    out = run(tfs(reps), [(0.0, 1, None), (0.001, 1, None)])
    # Opened at 0, it leaves at 2 ms with 2 rows and takes 12 ms.
    assert out == [(0.014, "OK"), (0.013, "OK")]
    assert dict(reps[0].record.batch_rows) == {2: 1}


def test_tfs_a_partial_batch_waits_for_a_free_thread_and_keeps_filling():
    reps = replicas()
    script = [(0.0, 4, None), (0.001, 1, None), (0.005, 1, None)]
    out = run(tfs(reps), script)
    # The full batch runs 0-14 ms. The next batch opened at 1 ms is due at 3 ms but the
    # thread is busy until 14 ms; by then it holds 2 rows: 12 ms more.
    assert out == [(0.014, "OK"), (0.025, "OK"), (0.021, "OK")]
    assert dict(reps[0].record.batch_rows) == {4: 1, 2: 1}


def test_tfs_a_call_that_does_not_fit_closes_the_open_batch():
    reps = replicas()
    out = run(tfs(reps), [(0.0, 3, None), (0.0, 2, None)])
    # [3] closes when 2 more rows cannot join it and runs at once (13 ms); [2] then waits
    # for the thread, by which time its timeout has passed (12 ms more).
    assert out == [(0.013, "OK"), (0.025, "OK")]
    assert dict(reps[0].record.batch_rows) == {3: 1, 2: 1}


def test_tfs_round_robin_over_replicas_and_threads():
    reps = replicas(2, concurrency=2)
    out = run(tfs(reps, max_batch=1), [(0.0, 1, None)] * 6)
    # Max batch 1: every call is a full batch; each replica runs two at a time.
    assert out == [(0.011, "OK")] * 4 + [(0.022, "OK")] * 2


def test_tfs_queue_full():
    reps = replicas()
    out = run(tfs(reps, max_batch=1, max_batches=2), [(0.0, 1, None)] * 4)
    # One batch runs, two wait; the fourth finds two batches queued.
    assert [code for _, code in out] == ["OK", "OK", "OK", "UNAVAILABLE"]


def test_tfs_refuses_a_call_larger_than_a_batch():
    out = run(tfs(replicas(), max_batch=2), [(0.0, 3, None)])
    assert out == [(0.0, "INVALID_ARGUMENT")]


def test_tfs_deadline_and_a_batch_nobody_waits_for():
    reps = replicas()
    script = [(0.0, 4, None), (0.001, 1, 0.005)]
    out = run(tfs(reps), script)
    assert out == [(0.014, "OK"), (0.005, "DEADLINE_EXCEEDED")]
    # The second batch's only caller gave up before a thread was free: it never ran.
    assert dict(reps[0].record.batch_rows) == {4: 1}


def test_tfs_serves_model_queues_in_turn():
    reps = replicas()
    shapes = [*SHAPES, OTHER]
    script = [(0.0, 4, None), (0.001, 1, None), (0.001, 5, None), (0.002, 1, None)]
    out = run(tfs(reps, shapes=shapes), script)
    # While the full batch runs (0-14 ms) a batch of m (2 rows) and one of n (1 row) become
    # due. The thread takes them in turn: m's queue comes first, then n's.
    assert out[0] == (0.014, "OK")
    ends = [round(lat + s[0], 9) for (lat, _), s in zip(out, script, strict=True)]
    assert ends == [0.014, 0.026, 0.037, 0.026]
