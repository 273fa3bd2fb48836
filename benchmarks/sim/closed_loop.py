"""Closed loop in the simulator: the batching-gain setup of `benchmarks/e2e/batching_gain.py`
(2 replicas at 50 ms + 50 us/row, 256 one-row callers, max batch 64), with the real engine
on the virtual clock. Each caller sends its next call the moment its answer comes; the
figure is answered calls per second in the measured window against the fleet's ideal
batched throughput (full batches on every replica all the time), for each policy and for
TFS's batching per replica behind round robin. Here nothing but the policy limits the
throughput: on the real stack the proxy's and the generator's CPU do as well.

    .venv/bin/python benchmarks/sim/closed_loop.py [--callers 256] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from batchproxy.errors import ProxyError
from batchproxy.sim import SimConfig
from batchproxy.sim.clock import run_virtual
from batchproxy.sim.simulate import System, make_replicas, make_system
from batchproxy.sim.workloads import Arrival, ShapeTable

SYSTEMS = ("tfs", "proxy:fixed", "proxy:adaptive")


async def closed_loop(system: System, shape: int, callers: int, warmup_s: float,
                      duration_s: float) -> tuple[int, int]:
    """(answered, failed) calls whose answer came inside the measured window."""
    loop = asyncio.get_running_loop()
    end = warmup_s + duration_s
    answered = failed = 0

    async def caller() -> None:
        nonlocal answered, failed
        while (sent := loop.time()) < end:
            try:
                await system.submit(Arrival(sent, shape, None))
            except ProxyError:
                failed += warmup_s <= loop.time() <= end
                continue
            if warmup_s <= loop.time() <= end:
                answered += 1

    system.start()
    await asyncio.gather(*(caller() for _ in range(callers)))
    await system.close()
    return answered, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    base = SimConfig(replicas=2, batch_cost_ms=50, row_cost_us=50, max_batch_size=64,
                     seed=args.seed)
    ideal = base.capacity_rows_per_s()
    print(f"ideal batched throughput: {ideal:,.0f} calls/s\n")
    print("| system | calls/s | x ideal | failed |")
    print("|---|---|---|---|")
    for kind in SYSTEMS:
        config = dataclasses.replace(base, systems=(kind,))
        table = ShapeTable(config.features)
        shape = table.index("model", 1)
        replicas = make_replicas(config, args.warmup + args.duration, frozenset(["model"]))
        system = make_system(kind, config, replicas, table.shapes)
        answered, failed = run_virtual(
            closed_loop(system, shape, args.callers, args.warmup, args.duration))
        rate = answered / args.duration
        print(f"| {kind} | {rate:,.0f} | {rate / ideal:.3f} | {failed} |")


if __name__ == "__main__":
    main()
