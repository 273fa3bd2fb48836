"""What watching every batch for a hedge costs the engine's CPU: the same simulated run
(16 replicas at 10 ms + 0.2 ms/row, 2,000 Poisson calls/s, adaptive policy, no faulty
replica, so no hedge is sent) with a 5 % hedge budget and with 0 %, alternated, repeated.
Prints process CPU microseconds per batch of each run and the ratio of the sums.

    .venv/bin/python benchmarks/sim/hedging_cost.py [--rounds 4] [--duration 8]
"""

from __future__ import annotations

import argparse
import time

from batchproxy.sim import SimConfig, simulate


def cpu_per_batch_us(budget: float, duration_s: float) -> tuple[float, int]:
    config = SimConfig(replicas=16, rates=(2000.0,), duration_s=duration_s, jitter=0.1,
                       deadline_ms=1000, seed=1, systems=("proxy:adaptive",),
                       hedge_budget_percent=budget)
    started = time.process_time()
    result = simulate(config).run("proxy:adaptive")
    cpu_s = time.process_time() - started
    return cpu_s, result.batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0, help="virtual seconds a run")
    args = parser.parse_args()
    totals = {0.0: 0.0, 5.0: 0.0}
    for _ in range(args.rounds):
        for budget in totals:
            cpu_s, batches = cpu_per_batch_us(budget, args.duration)
            totals[budget] += cpu_s
            print(f"hedge budget {budget:g} %: {cpu_s / batches * 1e6:.0f} us/batch "
                  f"({batches} batches)", flush=True)
    print(f"on / off: {totals[5.0] / totals[0.0]:.2f}x")


if __name__ == "__main__":
    main()
