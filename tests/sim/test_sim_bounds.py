"""The clairvoyant FIFO full-batch schedule on tiny scripted arrivals, where every time is
known exactly, and against the engine on a burst workload it is the floor of."""

from __future__ import annotations

import dataclasses

import pytest

from batchproxy.sim import SimConfig, simulate
from batchproxy.sim.bounds import fifo_full_batches
from batchproxy.sim.report import percentile
from batchproxy.sim.simulate import offered, sweep
from batchproxy.sim.workloads import Arrival, Shape, ShapeTable

SHAPES = [Shape("m", rows, b"") for rows in range(5)]  # shape i has i rows


def cost(rows: int) -> float:
    return 1.0 + 0.5 * rows  # seconds


def latencies(script: list[tuple[float, int]], servers: int = 1, full: int = 2,
              cycle_s: float | None = None) -> list[float]:
    arrivals = [Arrival(time_s, shape, None) for time_s, shape in script]
    return [round(value, 9) for value in
            fifo_full_batches(arrivals, SHAPES, servers, cost, full, cycle_s)]


def test_full_batches_start_together_on_free_servers() -> None:
    assert latencies([(0.0, 1)] * 4, servers=2) == [2.0] * 4


def test_a_full_batch_waits_for_its_last_row_then_for_a_free_server() -> None:
    # Batch one (0.0, 0.5) starts at 0.5 and ends at 2.5; batch two (0.6, 0.7) waits for it.
    assert latencies([(0.0, 1), (0.5, 1), (0.6, 1), (0.7, 1)]) == [2.5, 2.0, 3.9, 3.8]


def test_a_call_split_across_batches_is_answered_with_the_later() -> None:
    # Three rows, batches of two: rows 0-1 end at 2.0, row 2 runs 2.0-3.5.
    assert latencies([(0.0, 3)]) == [3.5]


def test_a_bursts_last_rows_leave_with_its_last_arrival() -> None:
    # Bursts every 10 s: the lone row of the first burst leaves at once, not with the next.
    assert latencies([(0.0, 1), (10.0, 1), (10.5, 1)], full=2, cycle_s=10.0) == [1.5, 2.5, 2.0]
    # One long stream: the first row waits for a second to fill its batch.
    assert latencies([(0.0, 1), (10.0, 1)], full=2) == [12.0, 2.0]


@pytest.mark.parametrize("servers, full", [(0, 2), (1, 0)])
def test_refuses_an_empty_fleet_or_batch(servers: int, full: int) -> None:
    with pytest.raises(ValueError):
        latencies([(0.0, 1)], servers=servers, full=full)


def test_the_engine_on_a_heavy_burst_workload_is_no_faster_than_the_schedule() -> None:
    """Where a backlog makes every batch full, the adaptive policy can start no batch
    sooner than the schedule; it comes within 5 % of its p99."""
    config = SimConfig(replicas=8, batch_cost_ms=100, row_cost_us=2000, max_batch_size=16,
                       workload="bursts", burst_on_s=0.1, burst_off_s=0.1, rows="1-4",
                       loads=(0.9,), duration_s=4.0, warmup_s=2.0, seed=3,
                       systems=("proxy:adaptive",), slo_ms=400)
    (rate, _), = sweep(config)
    table = ShapeTable(config.features)
    arrivals = offered(config, rate, table)
    schedule = fifo_full_batches(arrivals, table.shapes, config.replicas,
                                 lambda rows: 0.1 + 0.002 * rows, 16, 0.2)
    measured = sorted(value for value, arrival in zip(schedule, arrivals, strict=True)
                      if arrival.time_s >= config.warmup_s)
    bound_ms = 1000 * (percentile(measured, 0.99) or 0.0)
    (run,) = simulate(dataclasses.replace(config)).runs
    assert 0.99 * bound_ms <= run.p99_ms <= 1.05 * bound_ms  # 213.6 against 212.6 ms
