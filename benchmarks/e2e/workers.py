"""Workers: `batchproxy serve --workers 1` against `--workers 2` (SO_REUSEPORT), one-row
gRPC calls at saturation to two identity replicas. Reports throughput and the proxy's CPU
per request (all its processes), --workers 2 as a ratio to --workers 1, alternating rounds.

The generator opens several connections (--connections), since the kernel spreads
connections, not calls, over the workers.

    .venv/bin/python benchmarks/e2e/workers.py [--seconds 3.0] [--rounds 4]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from harness import (
    ExitStack,
    Measured,
    Process,
    alternate,
    fmt,
    grpc_spec,
    machine,
    measure,
    ratio_text,
    start_proxy,
    start_replica,
    timed,
)

from batchproxy.bench.cpu import cpu_seconds, process_tree

CONCURRENCY = 64
CONNECTIONS = 16


def worker_pids(proxy: Process) -> list[int]:
    return [pid for pid in process_tree(proxy.pid) if pid != proxy.pid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with ExitStack() as stack:
        replicas = [stack.enter_context(start_replica("identity", model_name="default"))
                    for _ in range(2)]
        proxies = {n: stack.enter_context(start_proxy(replicas, workers=n)) for n in (1, 2)}
        for n, proxy in proxies.items():
            print(f"--workers {n}: {' '.join(proxy.args[1:])} (pid {proxy.pid}, "
                  f"workers {worker_pids(proxy) or 'none: serves itself'})")

        splits: list[list[float]] = []

        def run(n: int) -> Callable[[], Measured]:
            proxy = proxies[n]
            workers = worker_pids(proxy)

            def once() -> Measured:
                before = [cpu_seconds(pid) for pid in workers]
                measured = measure(grpc_spec(
                    [proxy.address], concurrency=CONCURRENCY, duration_s=args.seconds,
                    warmup_s=args.warmup, connections=CONNECTIONS),
                    [proxy.pid], [r.pid for r in replicas])
                if workers:  # how SO_REUSEPORT spread the connections: CPU per worker
                    splits.append([cpu_seconds(pid) - b for pid, b in zip(workers, before,
                                                                          strict=True)])
                return measured

            return once

        with timed("gRPC"):
            pairs = alternate(args.rounds, run(1), run(2))
    print(f"\nworkers: {len(pairs)} round pair(s), closed loop c={CONCURRENCY} over "
          f"{CONNECTIONS} connections, one row per call")
    print(f"  {'':12}{'req/s':>9}{'proxy us/req':>14}{'replicas us/req':>17}"
          f"{'generator us/req':>18}{'p50 ms':>8}{'p99 ms':>8}")
    for index, (one, two) in enumerate(pairs):
        for label, m in (("workers 1", one), ("workers 2", two)):
            print(f"  {label + ' #' + str(index + 1):12}{fmt(m.rps):>9}"
                  f"{fmt(m.server_cpu_us):>14}{fmt(m.others_cpu_us):>17}"
                  f"{fmt(m.generator_cpu_us):>18}{fmt(m.p50, '.2f'):>8}{fmt(m.p99, '.2f'):>8}")
    rps = ratio_text([(a.rps, b.rps) for a, b in pairs])
    cpu = ratio_text([(a.server_cpu_us or 0, b.server_cpu_us or 0) for a, b in pairs])
    for split in splits:
        total = sum(split) or 1.0
        print("  workers 2, CPU split between the workers: "
              + " / ".join(f"{part / total:.0%}" for part in split))
    print(f"  => workers 2 / workers 1 throughput {rps}")
    print(f"  => workers 2 / workers 1 proxy CPU per request {cpu}")


if __name__ == "__main__":
    main()
