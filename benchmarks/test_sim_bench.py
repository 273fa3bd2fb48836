"""Cost of a simulation: 60 virtual seconds of a 16-replica fleet under 2,000 Poisson calls/s
(10 ms + 0.2 ms/row, jitter 0.1, 1 s deadlines), one system at a time: the real engine
(`proxy`) and the two baselines. The figure is wall seconds per run (one round each; the
run is long enough to be steady); extra_info has the process CPU seconds of the run (less
disturbed than wall time on a shared machine), calls per CPU second and the ratio of virtual
to wall time.

    .venv/bin/pytest benchmarks/test_sim_bench.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest

from batchproxy.sim import SimConfig, SimReport, simulate

VIRTUAL_S = 60.0
CONFIG = dict(replicas=16, rates=(2000.0,), duration_s=VIRTUAL_S, jitter=0.1,
              deadline_ms=1000, seed=1)


def measured(benchmark, config: SimConfig) -> tuple[SimReport, float]:
    """One simulated run under pytest-benchmark, and the process CPU seconds it took."""
    cpu_s: list[float] = []

    def run() -> SimReport:
        started = time.process_time()
        report = simulate(config)
        cpu_s.append(time.process_time() - started)
        return report

    report: SimReport = benchmark.pedantic(run, rounds=1, iterations=1)
    return report, cpu_s[0]


@pytest.mark.benchmark(group="simulate: 60 virtual s, 16 replicas, 2000 calls/s")
@pytest.mark.parametrize("system", ["proxy", "tfs", "direct"])
def test_simulate_60s(benchmark, system: str) -> None:
    report, cpu_s = measured(benchmark, SimConfig(**CONFIG, systems=(system,)))
    result = report.run(system)
    assert result.requests > 0.95 * VIRTUAL_S * 2000
    wall_s = benchmark.stats.stats.mean
    benchmark.extra_info["calls"] = result.requests
    benchmark.extra_info["cpu_s"] = round(cpu_s, 2)
    benchmark.extra_info["calls_per_cpu_s"] = round(result.requests / cpu_s)
    benchmark.extra_info["virtual_over_wall"] = round(VIRTUAL_S / wall_s, 2)
    benchmark.extra_info["p99_ms"] = result.p99_ms
    benchmark.extra_info["mean_batch_rows"] = result.mean_batch_rows


# What watching every batch for a hedge costs the engine: the same run with the adaptive
# policy, hedging on (5 % budget) and off (0 %). The figure that matters is calls per CPU
# second in extra_info, as a ratio between the two rows of this group.
@pytest.mark.benchmark(group="hedging: 60 virtual s, 16 replicas, 2000 calls/s, adaptive")
@pytest.mark.parametrize("budget", [0.0, 5.0])
def test_hedging_cost(benchmark, budget: float) -> None:
    report, cpu_s = measured(benchmark, SimConfig(**CONFIG, systems=("proxy:adaptive",),
                                                  hedge_budget_percent=budget))
    result = report.run("proxy:adaptive")
    assert result.requests > 0.95 * VIRTUAL_S * 2000
    benchmark.extra_info["cpu_s"] = round(cpu_s, 2)
    benchmark.extra_info["calls_per_cpu_s"] = round(result.requests / cpu_s)
    benchmark.extra_info["batches"] = result.batches
    benchmark.extra_info["cpu_us_per_batch"] = round(cpu_s / max(result.batches, 1) * 1e6)
