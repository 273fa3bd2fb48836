"""Policies side by side in the simulator: TFS's batching per replica behind round robin
(with its best batch timeout, swept), the proxy's fixed policy (TFS's rule over the whole
fleet) and the adaptive policy (learned costs, finish-time routing, staggered dispatch), on
several workloads at 30/60/80/90 % of capacity. Every figure is virtual time: seeded,
exact, the same on any machine.

Beside each load it prints a floor: an estimate of the best p99 any policy can reach on that
fleet, so that a ratio the issue asks for can be told apart from one the workload rules out.
- Poisson arrivals: the evenly staggered ideal. Batch starts spaced exactly T/N apart over
  N serial replicas, each batch holding the rows that arrive in T/N, where its time
  T = a + b*rows solves T = a + b * rate * T / N. A call then waits at most T/N for a start
  and is answered T later: p99 = T + 0.99 T/N. (TFS behind round robin waits for its own
  replica, up to T, so with N = 2 no policy can be below (1 + 1/2) / 2 = 0.75x TFS.)
- Bursts above capacity: the fluid bound. While on, rows arrive at `peak` > capacity C, so
  a queue grows at peak - C, and the call arriving 99 % of the way into a burst waits
  0.99 * on * (peak - C) / C for the rows before it (no policy serves rows faster than C),
  then at least a batch of its own rows. A burst the fleet keeps up with is staggered at
  its peak rate, as Poisson arrivals.
The staggered ideal is an estimate (a policy could, say, leave replicas idle), not a proof;
the fluid bound is a lower bound up to the arrivals' own randomness.

For bursts it also prints the clairvoyant FIFO full-batch schedule over the very calls the
policies are offered (`batchproxy.sim.bounds`): each full batch, oldest rows first, starts
the moment its last row is in and a replica is free. No policy that keeps calls in order,
sends full batches from a backlog and leaves no replica idle beside one starts any batch
sooner, so where the load keeps a backlog and a bar lies below it, no such policy meets that
bar. (At light load a partial batch on an idle replica costs nothing, and a policy that
sends one beats it.)

    .venv/bin/python benchmarks/sim/policies.py [--duration 30] [--warmup 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from batchproxy.sim import SimConfig, simulate
from batchproxy.sim.bounds import fifo_full_batches
from batchproxy.sim.report import percentile
from batchproxy.sim.simulate import offered, sweep
from batchproxy.sim.workloads import ShapeTable

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
    "E: 16 x (200 ms + 2 ms/row), batch 32, Poisson, rows 1 (x6), 4 (x3) or 16": SimConfig(
        replicas=16, batch_cost_ms=200, row_cost_us=2000, max_batch_size=32,
        rows="1:6,4:3,16:1"),
    "F: 32 x (100 ms + 2 ms/row), batch 16, on/off bursts (0.1 s each), 1-4 rows": SimConfig(
        replicas=32, batch_cost_ms=100, row_cost_us=2000, max_batch_size=16,
        workload="bursts", burst_on_s=0.1, burst_off_s=0.1, rows="1-4"),
    "G: 2 x (100 ms + 1 ms/row), each running 2 batches at once, batch 32, Poisson 1-row "
    "calls": SimConfig(replicas=2, concurrency=2, batch_cost_ms=100, row_cost_us=1000,
                       max_batch_size=32),
}


def floor_p99_ms(config: SimConfig, load: float) -> float | None:
    """The floor described above, in ms; None where it does not apply (a slow replica)."""
    if config.slow_replica != 1.0 or config.speeds:
        return None
    a, b = config.batch_cost_ms / 1000, config.row_cost_us / 1e6
    # A replica running k batches at once without slowing counts as k serial ones.
    n, capacity = config.replicas * config.concurrency, config.capacity_rows_per_s()
    full_batch_s = a + b * config.max_batch_size
    rate = load * capacity  # rows/s
    if config.workload == "bursts":
        on, off = config.burst_on_s, config.burst_off_s
        peak = rate * (on + off) / on
        if peak > capacity:
            smallest = min(rows for rows, _ in config.mix().rows)
            return 1000 * (0.99 * on * (peak - capacity) / capacity + a + b * smallest)
        rate = peak  # a burst the fleet keeps up with: staggered at its rate
    elif config.workload != "poisson":
        return None
    batch_s = a / (1 - b * rate / n)  # T = a + b * rate * T / n
    if rate * batch_s / n > config.max_batch_size:  # spacing capped by full batches
        batch_s = full_batch_s
    return 1000 * (batch_s + 0.99 * batch_s / n)


def fifo_p99_ms(config: SimConfig, load: float) -> float | None:
    """The p99 of the clairvoyant FIFO full-batch schedule described above, in ms, over the
    measured calls the simulation offers at `load`; None but for bursts on equal replicas."""
    if config.workload != "bursts" or config.slow_replica != 1.0 or config.speeds:
        return None
    config = dataclasses.replace(config, loads=(load,))
    (rate, _), = sweep(config)
    table = ShapeTable(config.features)
    arrivals = offered(config, rate, table)
    a, b = config.batch_cost_ms / 1000, config.row_cost_us / 1e6
    latencies = fifo_full_batches(arrivals, table.shapes, config.replicas * config.concurrency,
                                  lambda rows: a + b * rows, config.max_batch_size,
                                  config.burst_on_s + config.burst_off_s)
    measured = sorted(latency for latency, arrival in zip(latencies, arrivals, strict=True)
                      if arrival.time_s >= config.warmup_s)
    value = percentile(measured, 0.99)
    return None if value is None else 1000 * value


def p99(report, system: str) -> dict[float, float]:
    return {run.load: run.p99_ms for run in report.runs if run.system == system}


def inside_slo(report, system: str) -> dict[float, float]:
    return {run.load: run.inside_slo for run in report.runs if run.system == system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workloads", default="ABCDEFG", help="letters of the workloads to run")
    args = parser.parse_args()
    for title, base in WORKLOADS.items():
        if title[0] not in args.workloads:
            continue
        common = dict(loads=LOADS, duration_s=args.duration, warmup_s=args.warmup,
                      seed=args.seed, slo_ms=SLO_MS)
        common_config = dataclasses.replace(base, **common)
        proxies = simulate(dataclasses.replace(
            common_config, systems=("proxy:fixed", "proxy:adaptive")))
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
              "| adaptive/tfs | adaptive/fixed | adaptive inside 400 ms "
              "| floor p99 ms | floor/tfs | adaptive/floor | FIFO full-batch p99 ms "
              "| FIFO/fixed | adaptive/FIFO |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for load in LOADS:
            tfs_p99, timeout = best_tfs[load]
            floor = floor_p99_ms(base, load)
            floor_cells = ("- | - | -" if floor is None or math.isnan(floor) else
                           f"{floor:.1f} | {floor / tfs_p99:.2f} | {adaptive[load] / floor:.2f}")
            fifo = fifo_p99_ms(common_config, load)
            fifo_cells = ("- | - | -" if fifo is None else
                          f"{fifo:.1f} | {fifo / fixed[load]:.2f} | {adaptive[load] / fifo:.2f}")
            print(f"| {load:.0%} | {tfs_p99:.1f} ({timeout}) | {fixed[load]:.1f} "
                  f"| {adaptive[load]:.1f} | {adaptive[load] / tfs_p99:.2f} "
                  f"| {adaptive[load] / fixed[load]:.2f} | {slo[load]:.2%} | {floor_cells} "
                  f"| {fifo_cells} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
