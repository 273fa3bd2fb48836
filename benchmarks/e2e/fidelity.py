"""Simulator fidelity: one workload in the simulator (`batchproxy simulate`, the real engine
in virtual time) and on the real stack (reference replicas with the same cost model, the
proxy, `batchproxy bench` open loop), p50 and p99 side by side with their ratio.

4 serial replicas costing 100 ms + 1 ms per row, max batch 32, Poisson one-row calls at
30/60/80/90 % of the cost model's capacity (replicas x 32 / (100 ms + 32 x 1 ms)).

The simulator's replicas answer at no distance and exactly on their cost unless told
otherwise. Each load is simulated twice: so, and with what the real stack showed at that
load, both read from the fixed policy's learned costs (`GET /v1/batchproxy/replicas`):
- the round trip: mean `a_ms` less the cost model's 100 ms. That policy sends a partial
  batch only to a replica with nothing in flight, so what its fit adds to the 100 ms is the
  trip there and back, the proxy's turn and the replica's decoding, with no wait behind
  another batch;
- the spread of batch times about the fit (mean `spread`, the recent mean absolute
  residual as a share of the prediction), simulated as the replicas' jitter: a normal
  spread whose mean absolute deviation is that share has a shape sqrt(pi / 2) times it.
  The reference replicas keep their cost exactly; the spread is the proxy's view of them,
  its own loop and the machine's other work included, and the policies plan with it.

    .venv/bin/python benchmarks/e2e/fidelity.py [--seconds 20] [--loads 0.3,0.6,0.8,0.9]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import urllib.request

from harness import (
    ExitStack,
    Measured,
    fmt,
    grpc_spec,
    machine,
    measure,
    start_proxy,
    start_replica,
    timed,
)

from batchproxy.sim import SimConfig, simulate

REPLICAS = 4
BATCH_COST_MS = 100.0
ROW_COST_US = 1000.0
MAX_BATCH_SIZE = 32
# The policy whose learned fixed cost gives the round trip (it never sends a batch to wait).
ROUND_TRIP_POLICY = "fixed"


def capacity_per_s() -> float:
    return REPLICAS * MAX_BATCH_SIZE / (BATCH_COST_MS / 1e3 + MAX_BATCH_SIZE * ROW_COST_US / 1e6)


def ratio(measured: float | None, simulated: float | None) -> str:
    if not measured or not simulated:
        return "-"
    return f"{measured / simulated:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per rate")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--loads", default="0.3,0.6,0.8,0.9")
    parser.add_argument("--policies", default="fixed",
                        help="the proxy's flush policies, each measured both ways")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    rates = [round(load * capacity_per_s(), 1) for load in loads]
    print(f"# simulator fidelity on {machine()}")
    print(f"# {REPLICAS} replicas x ({BATCH_COST_MS:g} ms + {ROW_COST_US / 1000:g} ms/row), "
          f"max batch {MAX_BATCH_SIZE}, capacity {capacity_per_s():.0f} calls/s")
    measured: dict[tuple[str, float], Measured] = {}
    round_trip_ms: dict[float, float] = {}
    spread: dict[float, float] = {}
    with ExitStack() as stack, timed("real stack"):
        replicas = [stack.enter_context(start_replica(
            "identity", model_name="default", batch_cost_ms=BATCH_COST_MS,
            row_cost_us=ROW_COST_US)) for _ in range(REPLICAS)]
        for policy in policies:
            with start_proxy(replicas, max_batch_size=MAX_BATCH_SIZE,
                             batching_policy=policy) as proxy:
                for rate in rates:
                    spec = grpc_spec([proxy.address], rate=rate, duration_s=args.seconds,
                                     warmup_s=args.warmup, seed=1)
                    measured[policy, rate] = measure(spec, [proxy.pid],
                                                     [r.pid for r in replicas])
                    if policy == ROUND_TRIP_POLICY:
                        round_trip_ms[rate], spread[rate] = learned_trip_and_spread(
                            proxy.rest_url)
    with timed("simulator"):
        systems = ("tfs", *(f"proxy:{policy}" for policy in policies))
        config = SimConfig(
            replicas=REPLICAS, batch_cost_ms=BATCH_COST_MS, row_cost_us=ROW_COST_US,
            max_batch_size=MAX_BATCH_SIZE, rates=tuple(rates), duration_s=args.seconds,
            warmup_s=args.warmup, seed=1, features=1, systems=systems)
        report = simulate(config)
        distant = {rate: simulate(dataclasses.replace(
            config, rates=(rate,), network_ms=trip, jitter=math.sqrt(math.pi / 2) * spread[rate],
            systems=systems[1:])) for rate, trip in round_trip_ms.items()}
    for policy in policies:
        print(f"\n{policy} policy\n")
        print("| load | rate/s | sim p50 | real p50 | real/sim | sim p99 | real p99 "
              "| real/sim | round trip ms | spread % | sim p99 with them "
              "| real/sim with them | tfs-sim p99 | real errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for load, rate in zip(loads, rates, strict=True):
            sim = report.run(f"proxy:{policy}", rate)
            tfs = report.run("tfs", rate)
            real = measured[policy, rate]
            far = distant[rate].run(f"proxy:{policy}", rate) if rate in distant else None
            far_p99 = None if far is None else far.p99_ms
            print(f"| {load:.0%} | {rate:g} | {fmt(sim.p50_ms, '.0f')} "
                  f"| {fmt(real.p50, '.0f')} | {ratio(real.p50, sim.p50_ms)} "
                  f"| {fmt(sim.p99_ms, '.0f')} | {fmt(real.p99, '.0f')} "
                  f"| {ratio(real.p99, sim.p99_ms)} | {fmt(round_trip_ms.get(rate), '.1f')} "
                  f"| {fmt(100 * spread[rate] if rate in spread else None, '.1f')} "
                  f"| {fmt(far_p99, '.0f')} | {ratio(real.p99, far_p99)} "
                  f"| {fmt(tfs.p99_ms, '.0f')} | {real.result.failed} |")
    if len(policies) > 1:
        first, *others = policies
        print(f"\np99 of each policy against {first}, simulated (without and with the round "
              "trip and spread) and real\n")
        print("| load | policy | sim ratio | real ratio | real/sim | sim ratio with them "
              "| real/sim with them |")
        print("|---|---|---|---|---|---|---|")
        for load, rate in zip(loads, rates, strict=True):
            for policy in others:
                sim_ratio = p99_ratio(report, policy, first, rate)
                real_ratio = measured[policy, rate].p99 / measured[first, rate].p99
                far_ratio = (p99_ratio(distant[rate], policy, first, rate)
                             if rate in distant else None)
                print(f"| {load:.0%} | {policy} | {sim_ratio:.2f} | {real_ratio:.2f} "
                      f"| {real_ratio / sim_ratio:.2f} | {fmt(far_ratio, '.2f')} "
                      f"| {ratio(real_ratio, far_ratio)} |")


def p99_ratio(report, policy: str, first: str, rate: float) -> float:
    return (report.run(f"proxy:{policy}", rate).p99_ms or 0) / (
        report.run(f"proxy:{first}", rate).p99_ms or 1)


def learned_trip_and_spread(rest_url: str) -> tuple[float, float]:
    """The replicas' mean learned fixed cost less the cost model's (what each batch's trip
    adds), and their mean spread about the fit (see the module's note)."""
    with urllib.request.urlopen(f"{rest_url}/v1/batchproxy/replicas", timeout=10) as answer:
        replicas = json.loads(answer.read())["replicas"]
    learned = [r["models"]["default"] for r in replicas if "default" in r.get("models", {})]
    if not learned:
        return 0.0, 0.0
    trip = max(sum(c["a_ms"] for c in learned) / len(learned) - BATCH_COST_MS, 0.0)
    return trip, sum(c["spread"] for c in learned) / len(learned)


if __name__ == "__main__":
    main()
