"""Shared pieces of the end-to-end benchmarks: processes on loopback (the test suite's own
helpers, tests/procs.py), one load run with `batchproxy bench`'s generator, and the report.

Every figure is compared with a baseline measured in the same run on the same machine;
where rounds alternate baseline and subject, each round pair gives a ratio and the median
ratio is reported (neighbours on a shared machine come and go; a pair sees the same ones)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from procs import HOST, Process, free_port, start_process, start_replica  # noqa: E402
from proxy_procs import start_proxy  # noqa: E402

from batchproxy.bench import LoadSpec, RunResult, payload, run_load  # noqa: E402

__all__ = ["HOST", "ExitStack", "Process", "start_echo", "start_proxy", "start_replica"]

MODEL = "default"


def start_echo() -> Process:
    """The bare echo server (gRPC, and REST on rest_port): `batchproxy bench --echo_server`."""
    port, rest_port = free_port(), free_port()
    return start_process(
        [sys.executable, "-m", "batchproxy", "bench", "--echo_server", str(port),
         "--echo_rest_port", str(rest_port), "--echo_host", HOST],
        port, rest_port=rest_port)


def grpc_spec(targets: list[str], *, rows: int = 1, **load: object) -> LoadSpec:
    return LoadSpec(targets=tuple(targets), protocol="grpc", path=payload.PREDICT_PATH,
                    body=payload.grpc_predict_body(MODEL, "x", rows, (1,)), rows=rows,
                    **load)  # type: ignore[arg-type]


def rest_spec(targets: list[str], *, rows: int = 1, **load: object) -> LoadSpec:
    return LoadSpec(targets=tuple(targets), protocol="rest",
                    path=payload.rest_predict_path(MODEL),
                    body=payload.rest_predict_body(rows, (1,)), rows=rows,
                    **load)  # type: ignore[arg-type]


@dataclass
class Measured:
    """One load run, with the CPU of the process trees that serve it."""

    result: RunResult
    server_cpu_us: float | None  # the watched server's CPU per request
    others_cpu_us: float | None = None  # e.g. the replicas behind a proxy
    batch_rows: float = float("nan")  # mean rows per batch a proxy sent, where noted

    @property
    def rps(self) -> float:
        return self.result.throughput

    @property
    def p50(self) -> float:
        return self.result.latency_ms()["p50"] or float("nan")

    @property
    def p99(self) -> float:
        return self.result.latency_ms()["p99"] or float("nan")

    @property
    def server_busy(self) -> float:
        """The watched server's CPU over the window, in cores (1.0: one core flat out)."""
        cpu = self.result.watched_cpu_s
        return float("nan") if cpu is None else cpu / self.result.elapsed_s

    @property
    def generator_busy(self) -> float:
        return self.result.generator_cpu_s / self.result.elapsed_s

    @property
    def generator_cpu_us(self) -> float:
        return self.result.cpu_us_per_request(self.result.generator_cpu_s) or float("nan")


def measure(spec: LoadSpec, server: Sequence[int], others: Sequence[int] = (),
            processes: int = 1) -> Measured:
    """Run `spec`; the CPU of `server`'s process trees per request, and of `others`'."""
    from batchproxy.bench.cpu import CpuWindow

    extra = CpuWindow(others)
    extra.start()
    started = time.monotonic()
    result = run_load(spec, processes, None, server)
    extra.stop()
    if result.failed:
        print(f"  ! {result.failed} failed calls: {result.errors}", file=sys.stderr)
    others_us = None
    if extra.seconds is not None and result.in_window:
        # The window of `others` is the whole run, warm-up included: scale to the window.
        share = result.elapsed_s / max(time.monotonic() - started, 1e-9)
        others_us = extra.seconds * share / result.in_window * 1e6
    return Measured(result, result.cpu_us_per_request(result.watched_cpu_s), others_us)


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram served at `url`, e.g. the proxy's
    batchproxy_batch_rows on its REST port's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                for suffix in totals:
                    if sample.name == f"{name}_{suffix}":
                        totals[suffix] += sample.value
    return totals["sum"], totals["count"]


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    """Median over round pairs of subject / baseline."""
    return statistics.median(ratios(pairs))


def ratios(pairs: list[tuple[float, float]]) -> list[float]:
    return [subject / base for base, subject in pairs if base]


def ratio_text(pairs: list[tuple[float, float]]) -> str:
    """'0.76x (pairs 0.61-0.93)': the median and the spread over the round pairs."""
    values = ratios(pairs)
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}x (pairs {min(values):.2f}-{max(values):.2f})"


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def alternate(rounds: int, baseline: Callable[[], Measured],
              subject: Callable[[], Measured]) -> list[tuple[Measured, Measured]]:
    """(baseline, subject) per round; odd rounds run the subject first, so neither always
    runs on a machine that just warmed up."""
    pairs = []
    for index in range(rounds):
        if index % 2 == 0:
            base = baseline()
            other = subject()
        else:
            other = subject()
            base = baseline()
        pairs.append((base, other))
    return pairs


def rotate(rounds: int, runs: list[Callable[[], Measured]]) -> list[list[Measured]]:
    """Each round runs every one of `runs`, starting one later each round; the results come
    back in the order of `runs`."""
    results = []
    for index in range(rounds):
        order = [(index + k) % len(runs) for k in range(len(runs))]
        measured: dict[int, Measured] = {k: runs[k]() for k in order}
        results.append([measured[k] for k in range(len(runs))])
    return results


def machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at start; generator, "
            "servers and replicas all share them")


@contextmanager
def timed(title: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"# {title}", flush=True)
    yield
    print(f"({time.monotonic() - started:.0f} s)", flush=True)


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None or value != value else format(value, spec)
