"""Warm-up load on a replica with --workers N: how many warm-up batches the replica runs
when it joins a proxy of 1, 2 and 4 workers (a reference replica whose first Predict at each
batch size takes --first_call_ms longer, as graph tracing does; max_batch_size 8). The
baseline is the one-worker proxy of the same run: one batch at each size.

    .venv/bin/python benchmarks/e2e/warmup_workers.py [--first_call_ms 2500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import histogram_totals, machine, start_proxy, start_replica
from model_dirs import add_version  # tests/, on the path through harness

NAME = "traced"
MAX_BATCH = 8


def joined_everywhere(proxy_output: str, replica: str) -> int:
    return sum(1 for line in proxy_output.splitlines()
               if f"replica {replica}: joining -> healthy" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first_call_ms", type=int, default=2500)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    print(machine())
    baseline: float | None = None
    for workers in (int(n) for n in args.workers.split(",")):
        base = Path(tempfile.mkdtemp()) / NAME
        add_version(base, 1, model="identity", batch_cost_ms=2,
                    first_call_at_new_batch_size_ms=args.first_call_ms)
        replica = start_replica("identity", model_name=NAME, model_base_path=base,
                                file_system_poll_wait_seconds=0)
        started = time.perf_counter()
        proxy = start_proxy([replica], health_check_model=NAME, health_interval_ms=200,
                            max_batch_size=MAX_BATCH, workers=workers)
        try:
            deadline = time.monotonic() + 120
            while joined_everywhere(proxy.output(), replica.address) < workers:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{workers} workers: the replica never joined in all")
                time.sleep(0.1)
            took = time.perf_counter() - started
            rows, batches = histogram_totals(replica.rest_url, "batchproxy_replica_batch_rows")
        finally:
            proxy.stop()
            replica.stop()
        baseline = baseline or batches
        print(f"{workers} workers: {batches:.0f} warm-up batches ({rows:.0f} rows) on the "
              f"replica, {batches / baseline:.2f}x one worker's; healthy in every worker "
              f"after {took:.1f}s")


if __name__ == "__main__":
    main()
