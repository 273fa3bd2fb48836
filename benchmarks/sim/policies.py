"""Policies side by side in the simulator: TFS's batching per replica behind round robin
(with its best batch timeout, swept), the proxy's fixed policy (TFS's rule over the whole
fleet) and the adaptive policy (learned costs, finish-time routing, staggered dispatch), on
several workloads at 30/60/80/90 % of capacity. Every figure is virtual time: seeded,
exact, the same on any machine.

    .venv/bin/python benchmarks/sim/policies.py [--duration 30] [--warmup 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from batchproxy.sim import SimConfig, simulate

LOADS = (0.3, 0.6, 0.8, 0.9)
TFS_TIMEOUTS_US = (0, 2000, 5000, 20_000, 50_000)
SLO_MS = 400.0

WORKLOADS = {
    "A: 4 x (100 ms + 1 ms/row), batch 32, Poisson 1-row calls": SimConfig(
        replicas=4, batch_cost_ms=100, row_cost_us=1000, max_batch_size=32),
    "B: 8 x (20 ms + 0.5 ms/row), batch 32, on/off bursts (0.5 s each), 1-8 rows": SimConfig(
        replicas=8, batch_cost_ms=20, row_cost_us=500, max_batch_size=32,
        workload="bursts", burst_on_s=0.5, burst_off_s=0.5, rows="1-8"),
    "C: 2 x (50 ms + 50 us/row), batch 64, Poisson, rows 1 (x4) or 8": SimConfig(
        replicas=2, batch_cost_ms=50, row_cost_us=50, max_batch_size=64, rows="1:4,8"),
    "D: as A, one replica 3x slower": SimConfig(
        replicas=4, batch_cost_ms=100, row_cost_us=1000, max_batch_size=32, slow_replica=3),
}


def p99(report, system: str) -> dict[float, float]:
    return {run.load: run.p99_ms for run in report.runs if run.system == system}


def inside_slo(report, system: str) -> dict[float, float]:
    return {run.load: run.goodput_per_s * run.duration_s / run.requests
            for run in report.runs if run.system == system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workloads", default="ABCD", help="letters of the workloads to run")
    args = parser.parse_args()
    for title, base in WORKLOADS.items():
        if title[0] not in args.workloads:
            continue
        common = dict(loads=LOADS, duration_s=args.duration, warmup_s=args.warmup,
                      seed=args.seed, slo_ms=SLO_MS)
        proxies = simulate(dataclasses.replace(
            base, systems=("proxy:fixed", "proxy:adaptive"), **common))
        best_tfs: dict[float, tuple[float, int]] = {}
        for timeout in TFS_TIMEOUTS_US:
            tfs = simulate(dataclasses.replace(
                base, systems=("tfs",), batch_timeout_micros=timeout, **common))
            for load, value in p99(tfs, "tfs").items():
                if load not in best_tfs or value < best_tfs[load][0]:
                    best_tfs[load] = (value, timeout)
        fixed, adaptive = p99(proxies, "proxy:fixed"), p99(proxies, "proxy:adaptive")
        slo = inside_slo(proxies, "proxy:adaptive")
        print(f"\n### {title}\n")
        print("| load | tfs best p99 ms (timeout us) | fixed p99 ms | adaptive p99 ms "
              "| adaptive/tfs | adaptive/fixed | adaptive inside 400 ms |")
        print("|---|---|---|---|---|---|---|")
        for load in LOADS:
            tfs_p99, timeout = best_tfs[load]
            print(f"| {load:.0%} | {tfs_p99:.1f} ({timeout}) | {fixed[load]:.1f} "
                  f"| {adaptive[load]:.1f} | {adaptive[load] / tfs_p99:.2f} "
                  f"| {adaptive[load] / fixed[load]:.2f} | {slo[load]:.2%} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
