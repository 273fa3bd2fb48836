"""Gray failure on the real stack: one of three reference replicas is SIGSTOPped (it keeps
its connections open and answers nothing, health checks included) under 100 closed-loop
callers with 2 s deadlines, with hedging on (the adaptive policy's 5 % budget) and, as the
baseline in the same run, off (`--hedge_budget_percent 0`).

Replicas: the identity model at 20 ms a batch + 200 us a row, one batch at a time (an
accelerator's fixed launch cost and a small per-row cost). The proxy: `--batching_policy
adaptive`, max batch 32. Each call sends 1 to 3 rows whose values name the caller and the
call, and every answer is checked against them (identity: its own rows).

Phases per run: warm-up, a healthy window (its p99 is the bar's reference), replica 0
stopped for --stop_s, SIGCONT, a recovery window. Calls count in the phase they started in,
except that one sent while healthy and still out at the stop counts as stopped (the stopped
replica may hold it); a failed call counts with the time it took. Hedges and batches are read from
the proxy's /metrics at the start of the stop and at the end.

    .venv/bin/python benchmarks/e2e/gray_failure.py [--rounds 1] [--stop_s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import grpc
import harness  # noqa: F401  (first: puts tests/ on the path)
import numpy as np
import requests
from grpc_client import predict_request, stub, to_array
from harness import Process, fmt, machine, start_proxy, start_replica
from prometheus_client.parser import text_string_to_metric_families

from batchproxy.bench.cpu import tree_cpu_seconds

MODEL = "identity"
CALLERS = 100
CHANNELS = 4
DEADLINE_S = 2.0
BATCH_COST_MS = 20
ROW_COST_US = 200
MAX_BATCH = 32
MAX_CALLS = 2_000_000  # a bound on the records, whatever the durations asked
PHASES = ("warm", "healthy", "stopped", "recovery")


@dataclass
class Call:
    phase: str
    seconds: float
    code: str
    wrong: bool = False


@dataclass
class Run:
    percent: float
    calls: list[Call] = field(default_factory=list)
    at_healthy: dict[str, float] = field(default_factory=dict)
    at_stop: dict[str, float] = field(default_factory=dict)
    at_end: dict[str, float] = field(default_factory=dict)
    faulty_s: float = 0.0  # from the stop to the end of the recovery window
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy over the timed phases

    def of(self, *phases: str) -> list[Call]:
        return [call for call in self.calls if call.phase in phases]

    def delta(self, key: str) -> float:
        return self.at_end.get(key, 0.0) - self.at_stop.get(key, 0.0)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[int(fraction * (len(ordered) - 1))] if ordered else float("nan")


def p99_ms(calls: list[Call]) -> float:
    return percentile([call.seconds for call in calls], 0.99) * 1000


def proxy_counters(rest_url: str) -> dict[str, float]:
    """hedged:<outcome>, batches, ejections and retries (all replicas) from the proxy's
    /metrics."""
    text = requests.get(f"{rest_url}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "batchproxy_hedged_batches_total":
                key = f"hedged:{sample.labels['outcome']}"
            elif sample.name == "batchproxy_batches_total":
                key = "batches"
            elif sample.name == "batchproxy_replica_ejections_total":
                key = "ejections"
            elif sample.name == "batchproxy_retries_total":
                key = "retries"
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


def rows_of(caller: int, sequence: int) -> np.ndarray:
    """1 to 3 rows of [caller, sequence, row]: exact in float32 for any count run here."""
    rows = 1 + sequence % 3
    return np.array([[caller, sequence, row] for row in range(rows)], np.float32)


async def load(run: Run, proxy: Process, replicas: list[Process],
               durations: dict[str, float]) -> None:
    stopped = replicas[0]
    channels = [grpc.aio.insecure_channel(proxy.address) for _ in range(CHANNELS)]
    try:
        stubs = [stub(channel) for channel in channels]
        for client in stubs:  # connected before the clock starts
            await client.Predict(predict_request(MODEL, {"x": rows_of(0, 0)}), timeout=10)
        phase = "warm"
        started = time.monotonic()
        ends, total = {}, 0.0
        for name in PHASES:
            total += durations[name]
            ends[name] = started + total
        end = ends["recovery"]

        def faulty(at: str) -> str:
            # A call sent while healthy that was still out at the stop (one the stopped
            # replica held) belongs to the fault, not to the healthy reference.
            return "stopped" if at == "healthy" and phase != "healthy" else at

        async def caller(index: int) -> None:
            client = stubs[index % CHANNELS]
            sequence = 0
            while time.monotonic() < end and len(run.calls) < MAX_CALLS:
                sent = rows_of(index, sequence)
                sequence += 1
                at, began = phase, time.perf_counter()
                try:
                    answer = await client.Predict(predict_request(MODEL, {"x": sent}),
                                                  timeout=DEADLINE_S)
                except grpc.aio.AioRpcError as err:
                    run.calls.append(Call(faulty(at), time.perf_counter() - began,
                                          err.code().name))
                    continue
                took = time.perf_counter() - began
                at = faulty(at)
                got = to_array(answer.outputs["y"])
                run.calls.append(Call(at, took, "OK",
                                      got.shape != sent.shape or not np.array_equal(got, sent)))

        async def conductor() -> None:
            nonlocal phase
            await asyncio.sleep(max(0.0, ends["warm"] - time.monotonic()))
            phase = "healthy"
            run.at_healthy = await asyncio.to_thread(proxy_counters, proxy.rest_url)
            # Who uses the shared cores: this process (the callers), the proxy, the replicas.
            before = (time.monotonic(), time.process_time(), tree_cpu_seconds([proxy.pid]),
                      tree_cpu_seconds(replica.pid for replica in replicas))
            await asyncio.sleep(max(0.0, ends["healthy"] - time.monotonic()))
            run.at_stop = await asyncio.to_thread(proxy_counters, proxy.rest_url)
            stop_at = time.monotonic()
            stopped.signal(signal.SIGSTOP)
            phase = "stopped"
            try:
                await asyncio.sleep(max(0.0, ends["stopped"] - time.monotonic()))
            finally:
                stopped.signal(signal.SIGCONT)
            phase = "recovery"
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            run.faulty_s = time.monotonic() - stop_at
            after = (time.monotonic(), time.process_time(), tree_cpu_seconds([proxy.pid]),
                     tree_cpu_seconds(replica.pid for replica in replicas))
            wall = after[0] - before[0]
            for index, name in enumerate(("callers", "proxy", "replicas"), 1):
                run.cpu[name] = (after[index] - before[index]) / wall

        await asyncio.wait_for(
            asyncio.gather(conductor(), *(caller(i) for i in range(CALLERS))),
            timeout=total + DEADLINE_S + 30)
        # Counters after the last call answered: every batch and hedge of the window is in.
        run.at_end = await asyncio.to_thread(proxy_counters, proxy.rest_url)
    finally:
        for channel in channels:
            await channel.close()


def one_run(percent: float, durations: dict[str, float]) -> Run:
    run = Run(percent)
    with ExitStack() as stack:
        replicas = []
        for _ in range(3):
            replica = start_replica(MODEL, batch_cost_ms=BATCH_COST_MS,
                                    row_cost_us=ROW_COST_US)
            stack.callback(replica.stop)
            replicas.append(replica)
        # SIGCONT before any stop: a stopped process ignores SIGTERM until it runs again.
        stack.callback(replicas[0].signal, signal.SIGCONT)
        proxy = start_proxy(replicas, batching_policy="adaptive", max_batch_size=MAX_BATCH,
                            hedge_budget_percent=f"{percent:g}")
        stack.callback(proxy.stop)
        asyncio.run(load(run, proxy, replicas, durations))
    return run


def budget_bound(run: Run) -> float:
    """HedgeBudget's bound over the faulty window: burst 3 + percent % of batches sent +
    1 a second of floor (engine/hedging.py)."""
    if run.percent <= 0:
        return 0.0
    return 3 + run.delta("batches") * run.percent / 100 + run.faulty_s * 1.0


def report(runs: list[Run], durations: dict[str, float]) -> None:
    print("| hedging | calls | wrong | codes | healthy p99 ms | "
          "stopped p99 / max ms | faulty p99 ms | stopped / healthy | faulty / healthy | "
          "3x healthy p99 ms | hedges won / sent | batches | hedge bound | hedges while healthy | "
          "ejections, retries | calls/s healthy, "
          "stopped, recovery | cores: callers, proxy, replicas |")
    print("|" + "---|" * 17)
    for run in runs:
        healthy = p99_ms(run.of("healthy"))
        stopped = p99_ms(run.of("stopped"))
        longest = max((call.seconds for call in run.of("stopped")), default=float("nan"))
        faulty = p99_ms(run.of("stopped", "recovery"))
        codes: dict[str, int] = {}
        for call in run.of(*PHASES[1:]):
            codes[call.code] = codes.get(call.code, 0) + 1
        measured = run.of(*PHASES[1:])
        wrong = sum(call.wrong for call in run.calls)
        won = run.delta("hedged:won")
        sent = won + run.delta("hedged:lost") + run.delta("hedged:failed")
        refused = run.delta("hedged:budget_exceeded") + run.delta("hedged:no_replica")
        label = f"{run.percent:g} %" if run.percent else "off"
        healthy_hedges = sum(run.at_stop.get(f"hedged:{outcome}", 0.0)
                             - run.at_healthy.get(f"hedged:{outcome}", 0.0)
                             for outcome in ("won", "lost", "failed"))
        rates = ", ".join(f"{len(run.of(name)) / durations[name]:,.0f}"
                          for name in PHASES[1:])
        cores = ", ".join(f"{run.cpu.get(name, float('nan')):.2f}"
                          for name in ("callers", "proxy", "replicas"))
        code_text = ", ".join(f"{name} {count:,}" for name, count in sorted(codes.items()))
        print(f"| {label} | {len(measured):,} | {wrong} | {code_text} | {fmt(healthy, '.1f')} "
              f"| {fmt(stopped, '.1f')} / {fmt(longest * 1000, '.0f')} | {fmt(faulty, '.1f')} | "
              f"{fmt(stopped / healthy, '.2f')}x | {fmt(faulty / healthy, '.2f')}x | "
              f"{fmt(3 * healthy, '.0f')} | {won:.0f} / {sent:.0f}"
              f"{f' ({refused:.0f} not sent)' if refused else ''} | "
              f"{run.delta('batches'):,.0f} | {fmt(budget_bound(run), '.0f')} | "
              f"{healthy_hedges:.0f} | {run.delta('ejections'):.0f}, "
              f"{run.delta('retries'):.0f} | "
              f"{rates} | {cores} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1,
                        help="pairs of runs; odd rounds run the baseline first")
    parser.add_argument("--warm_s", type=float, default=3.0)
    parser.add_argument("--healthy_s", type=float, default=10.0)
    parser.add_argument("--stop_s", type=float, default=10.0)
    parser.add_argument("--recovery_s", type=float, default=5.0)
    parser.add_argument("--hedge_budget_percent", type=float, default=5.0)
    args = parser.parse_args()
    durations = {"warm": args.warm_s, "healthy": args.healthy_s, "stopped": args.stop_s,
                 "recovery": args.recovery_s}
    print(f"# gray failure on {machine()}; {CALLERS} callers, {DEADLINE_S:g} s deadlines, "
          f"replica 0 stopped {args.stop_s:g} s after {args.warm_s:g} + {args.healthy_s:g} s, "
          f"{args.recovery_s:g} s recovery", flush=True)
    runs = []
    for index in range(args.rounds):
        order = [args.hedge_budget_percent, 0.0]
        for percent in order if index % 2 == 0 else order[::-1]:
            runs.append(one_run(percent, durations))
            print(f"  run {len(runs)} (hedging {percent:g} %) done, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    report(sorted(runs, key=lambda run: -run.percent), durations)


if __name__ == "__main__":
    main()
