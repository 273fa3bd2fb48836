"""What a run shows: a progress line per second on stderr, then a table on stdout, and the
figures as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from batchproxy.bench.driver import Tick
from batchproxy.bench.results import RunResult


class ProgressPrinter:
    def __init__(self, rows: int, stream: TextIO = sys.stderr, label: str = "") -> None:
        self.rows = rows
        self.stream = stream
        self.label = f"{label} " if label else ""

    def __call__(self, tick: Tick) -> None:
        done = tick.ok + tick.failed
        if tick.latencies:
            p50, p99 = np.percentile(np.asarray(tick.latencies) * 1e3, (50, 99))
            latency = f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
        else:
            latency = f"{'no answers':>29}"
        warm = "  (warm-up)" if tick.warmup else ""
        print(f"{self.label}[{tick.second:3d}s] {done:8,d} req/s {done * self.rows:9,d} rows/s  "
              f"{latency}  failed {tick.failed:,d}  in flight {tick.in_flight:,d}{warm}",
              file=self.stream, flush=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: Sequence[RunResult]) -> str:
    """The figures of one or more runs, one line each, then notes on errors and CPU."""
    header = (f"{'mode':<7}{'offered':>10}{'req/s':>11}{'rows/s':>11}{'p50 ms':>9}"
              f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ok':>10}{'failed':>8}")
    lines = [header, "-" * len(header)]
    notes: list[str] = []
    for result in results:
        spec, latency = result.spec, result.latency_ms()
        lines.append(
            f"{spec.mode:<7}{spec.offered:>10}{result.throughput:>11,.0f}"
            f"{result.rows_per_s:>11,.0f}{_ms(latency['p50']):>9}{_ms(latency['p90']):>9}"
            f"{_ms(latency['p99']):>9}{_ms(latency['max']):>9}{result.ok:>10,d}"
            f"{result.failed:>8,d}")
        where = f"{spec.mode} {spec.offered}:"
        if result.errors:
            codes = ", ".join(f"{code} {count:,d}" for code, count in result.errors.items())
            notes.append(f"{where} errors: {codes}")
        gen_us = result.cpu_us_per_request(result.generator_cpu_s)
        busy = result.generator_cpu_s / result.elapsed_s / result.processes * 100
        notes.append(
            f"{where} generator {result.processes} process(es), CPU "
            f"{'-' if gen_us is None else f'{gen_us:.0f}'} us/request, {busy:.0f}% of a core "
            "each" + (" (near 100%: the generator may be the bottleneck)" if busy > 90 else ""))
        watched = result.cpu_us_per_request(result.watched_cpu_s)
        if watched is not None:
            notes.append(f"{where} watched processes CPU {watched:.0f} us/request")
        lag = result.lag_ms()
        if lag is not None:
            notes.append(f"{where} send lag p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms, "
                         f"max {lag['max']:.2f} ms after the scheduled arrival")
        if result.dropped:
            notes.append(f"{where} {result.dropped:,d} arrivals dropped: "
                         f"{spec.max_outstanding:,d} calls already in flight")
        for problem in sorted(set(result.connect_problems)):
            notes.append(f"{where} connecting: {problem}")
    return "\n".join([*lines, "", *notes])


def to_json(results: Sequence[RunResult], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(extra or {}), "runs": [result.to_dict() for result in results]}


def write_json(path: str | Path, results: Sequence[RunResult],
               extra: dict[str, Any] | None = None) -> None:
    Path(path).write_text(json.dumps(to_json(results, extra), indent=1) + "\n")
