"""Overload on the real stack: one replica at 80 ms per batch of 8 (capacity 100 calls/s),
offered 5x that for 20 s with 1 s deadlines; how many calls were answered, refused and late,
how fast refusals come, peak memory, and throughput right after, against the throughput
measured just before (same run).

    .venv/bin/python benchmarks/e2e/overload.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio

from harness import ROOT, machine  # noqa: F401  (puts tests/ on the path)
from test_overload import CAPACITY, DURATION_S, OFFERED, run_overload


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[int(fraction * (len(ordered) - 1))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=max(DURATION_S, 20))
    args = parser.parse_args()
    baseline, outcomes, peak_rss, recovery, first_after, proxy_codes = asyncio.run(
        run_overload(args.seconds))
    ok = [latency for code, latency in outcomes if code == "OK"]
    refused = [latency for code, latency in outcomes if code == "UNAVAILABLE"]
    late = sum(1 for code, _ in outcomes if code == "DEADLINE_EXCEEDED")
    print(f"# overload on {machine()}")
    print(f"offered {OFFERED:.0f}/s for {args.seconds:g}s against capacity {CAPACITY:.0f}/s")
    print(f"answered {len(ok)} ({len(ok) / args.seconds / CAPACITY:.2f}x capacity), "
          f"refused {len(refused)}, late {late} ({late / max(len(ok), 1):.1%} of answered)")
    print(f"OK p99 {percentile(ok, 0.99) * 1000:.0f} ms; refusal p50 "
          f"{percentile(refused, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(refused, 0.99) * 1000:.1f} ms")
    print(f"proxy peak RSS {peak_rss:.0f} MB; proxy's own codes {proxy_codes}")
    print(f"recovery {recovery.ok / 2:.0f}/s against {baseline.ok / 2:.0f}/s before "
          f"({recovery.ok / max(baseline.ok, 1):.2f}x), first call {first_after:.2f} s after")


if __name__ == "__main__":
    main()
