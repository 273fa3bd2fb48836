"""Workers: `batchproxy serve --workers 1` against `--workers 2` (SO_REUSEPORT), one-row
gRPC calls at saturation to two identity replicas. Reports throughput and the proxy's CPU
per request (all its processes), --workers 2 as a ratio to --workers 1, alternating rounds.

The generator opens several connections (--connections), since the kernel spreads
connections, not calls, over the workers.

    .venv/bin/python benchmarks/e2e/workers.py [--seconds 3.0] [--rounds 4] [--workers 2]
        [--max_inflight 2] [--batch_cost_ms 0] [--reference_src DIR]

With --reference_src, a third proxy (--workers N too) runs from another source tree, e.g.
one whose workers do not share the fleet, with replicas of its own; rounds rotate the order.

Also reported: the mean rows per batch (the proxy's batchproxy_batch_rows, all workers in
one scrape), and the most Predicts each replica held at once over the whole run (its
batchproxy_replica_peak_inflight_predicts), which must not pass --max_inflight.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from harness import (
    ExitStack,
    Measured,
    Process,
    fmt,
    grpc_spec,
    histogram_totals,
    machine,
    measure,
    ratio_text,
    rotate,
    start_proxy,
    start_replica,
    timed,
)

from batchproxy.bench.cpu import cpu_seconds, process_tree

CONCURRENCY = 64
CONNECTIONS = 16


def worker_pids(proxy: Process) -> list[int]:
    return [pid for pid in process_tree(proxy.pid) if pid != proxy.pid]


def replica_peak(replica: Process) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{replica.rest_url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("batchproxy_replica_peak_inflight_predicts "):
                return int(float(line.split()[1]))
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="against --workers 1")
    parser.add_argument("--max_inflight", type=int, default=2,
                        help="--max_inflight_per_replica of every proxy")
    parser.add_argument("--batch_cost_ms", type=float, default=0.0,
                        help="the replicas' cost per batch")
    parser.add_argument("--reference_src", default=None, metavar="DIR",
                        help="also run --workers N from this source tree, with replicas of "
                             "its own, in every round")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    subject = args.workers
    replica_flags = {"batch_cost_ms": args.batch_cost_ms} if args.batch_cost_ms else {}
    with ExitStack() as stack:
        def fleet() -> list[Process]:
            return [stack.enter_context(start_replica("identity", model_name="default",
                                                      **replica_flags))
                    for _ in range(2)]

        replicas = fleet()
        subjects: list[tuple[str, Process, list[Process]]] = [
            (f"workers {n}", stack.enter_context(start_proxy(
                replicas, workers=n, max_inflight_per_replica=args.max_inflight)), replicas)
            for n in (1, subject)]
        if args.reference_src:
            own = fleet()
            subjects.append((f"ref. w. {subject}", stack.enter_context(start_proxy(
                own, workers=subject, max_inflight_per_replica=args.max_inflight,
                env={"PYTHONPATH": args.reference_src})), own))
        for label, proxy, _ in subjects:
            print(f"{label}: {' '.join(proxy.args[1:])} (pid {proxy.pid}, "
                  f"workers {worker_pids(proxy) or 'none: serves itself'})")
        if args.reference_src:
            print(f"ref. w. {subject}: from {args.reference_src}, with replicas of its own")

        splits: list[list[float]] = []

        def run(proxy: Process, fleet_of: list[Process]) -> Callable[[], Measured]:
            workers = worker_pids(proxy)

            def once() -> Measured:
                before = [cpu_seconds(pid) for pid in workers]
                rows, batches = histogram_totals(proxy.rest_url, "batchproxy_batch_rows")
                measured = measure(grpc_spec(
                    [proxy.address], concurrency=CONCURRENCY, duration_s=args.seconds,
                    warmup_s=args.warmup, connections=CONNECTIONS),
                    [proxy.pid], [r.pid for r in fleet_of])
                rows_after, batches_after = histogram_totals(proxy.rest_url,
                                                             "batchproxy_batch_rows")
                sent = batches_after - batches
                measured.batch_rows = (rows_after - rows) / sent if sent else float("nan")
                if workers and proxy is subjects[1][1]:  # how SO_REUSEPORT spread them
                    splits.append([cpu_seconds(pid) - b for pid, b in zip(workers, before,
                                                                          strict=True)])
                return measured

            return once

        with timed("gRPC"):
            rounds = rotate(args.rounds, [run(proxy, own) for _, proxy, own in subjects])
        peaks = {label: [replica_peak(replica) for replica in own]
                 for label, _, own in subjects[1:]}
    print(f"\nworkers: {len(rounds)} round(s), closed loop c={CONCURRENCY} over "
          f"{CONNECTIONS} connections, one row per call")
    print(f"  {'':14}{'req/s':>9}{'proxy us/req':>14}{'replicas us/req':>17}"
          f"{'generator us/req':>18}{'p50 ms':>8}{'p99 ms':>8}{'rows/batch':>11}")
    for index, measured in enumerate(rounds):
        for (label, _, _), m in zip(subjects, measured, strict=True):
            print(f"  {label + ' #' + str(index + 1):14}{fmt(m.rps):>9}"
                  f"{fmt(m.server_cpu_us):>14}{fmt(m.others_cpu_us):>17}"
                  f"{fmt(m.generator_cpu_us):>18}{fmt(m.p50, '.2f'):>8}{fmt(m.p99, '.2f'):>8}"
                  f"{fmt(m.batch_rows, '.1f'):>11}")
    for split in splits:
        total = sum(split) or 1.0
        print(f"  workers {subject}, CPU split between the workers: "
              + " / ".join(f"{part / total:.0%}" for part in split))
    for index, against in ((1, 0), (2, 0), (1, 2))[:1 if len(subjects) == 2 else 3]:
        pairs = [(r[against], r[index]) for r in rounds]
        rps = ratio_text([(a.rps, b.rps) for a, b in pairs])
        cpu = ratio_text([(a.server_cpu_us or 0, b.server_cpu_us or 0) for a, b in pairs])
        name = f"{subjects[index][0]} / {subjects[against][0]}"
        print(f"  => {name}: throughput {rps}, proxy CPU per request {cpu}")
    # The first two proxies share one pair of replicas: its peaks cover both.
    for label, peak in peaks.items():
        print(f"  => replicas' peak in-flight Predicts behind {label}: {peak} "
              f"(limit {args.max_inflight})")


if __name__ == "__main__":
    main()
