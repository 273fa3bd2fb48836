"""A run's figures: what one generator process returns (WorkerResult) and their exact merge
(RunResult: latency arrays are concatenated, never averaged)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchproxy.bench.spec import LoadSpec

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class WorkerResult:
    latencies: np.ndarray  # seconds, one per answered call of the measured part
    lags: np.ndarray  # open loop: seconds each call left after its scheduled time
    errors: dict[str, int]
    sent: int
    ok: int
    in_window: int  # calls (answered or failed) completed inside the measured window
    dropped: int  # open loop: arrivals not sent because max_outstanding were in flight
    window_start: float  # time.monotonic(), shared by all processes of a run
    window_end: float
    cpu_s: float  # this generator process's own CPU in the window (all its threads)
    connect_problems: list[str] = field(default_factory=list)
    first_error: str | None = None  # "CODE: message" of the first failed call


@dataclass
class RunResult:
    spec: LoadSpec
    processes: int
    latencies: np.ndarray
    lags: np.ndarray
    errors: dict[str, int]
    sent: int
    ok: int
    in_window: int
    dropped: int
    elapsed_s: float
    generator_cpu_s: float
    watched_cpu_s: float | None = None  # the --watch_pid trees' CPU in the window
    connect_problems: list[str] = field(default_factory=list)
    first_error: str | None = None

    @classmethod
    def merge(cls, spec: LoadSpec, parts: list[WorkerResult]) -> RunResult:
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part.errors)
        start = min(part.window_start for part in parts)
        end = max(part.window_end for part in parts)
        return cls(
            spec=spec, processes=len(parts),
            latencies=np.concatenate([part.latencies for part in parts]),
            lags=np.concatenate([part.lags for part in parts]),
            errors=dict(errors.most_common()),
            sent=sum(part.sent for part in parts), ok=sum(part.ok for part in parts),
            in_window=sum(part.in_window for part in parts),
            dropped=sum(part.dropped for part in parts),
            elapsed_s=max(end - start, 1e-9),
            generator_cpu_s=sum(part.cpu_s for part in parts),
            connect_problems=[p for part in parts for p in part.connect_problems],
            first_error=next((p.first_error for p in parts if p.first_error), None))

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Calls completed (answered or failed) per second of the measured window."""
        return self.in_window / self.elapsed_s

    @property
    def rows_per_s(self) -> float:
        return self.throughput * self.spec.rows

    @property
    def offered_rate(self) -> float:
        """The x axis of a latency plot: the open loop's rate, or what a closed loop got."""
        return self.spec.rate if self.spec.rate else self.throughput

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies.size:
            return {"min": None, "mean": None, "max": None,
                    **{_pname(p): None for p in PERCENTILES}}
        ms = self.latencies * 1e3
        values = np.percentile(ms, PERCENTILES)
        return {"min": float(ms.min()), "mean": float(ms.mean()),
                **{_pname(p): float(v) for p, v in zip(PERCENTILES, values, strict=True)},
                "max": float(ms.max())}

    def lag_ms(self) -> dict[str, float] | None:
        if not self.lags.size:
            return None
        ms = self.lags * 1e3
        return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                "max": float(ms.max())}

    def cpu_us_per_request(self, cpu_s: float | None) -> float | None:
        return None if cpu_s is None or not self.in_window else cpu_s / self.in_window * 1e6

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "mode": spec.mode, "protocol": spec.protocol, "targets": list(spec.targets),
            "concurrency": spec.concurrency or None, "rate": spec.rate or None,
            "rows_per_request": spec.rows, "processes": self.processes,
            "connections": spec.connections, "warmup_s": spec.warmup_s,
            "elapsed_s": self.elapsed_s, "sent": self.sent, "ok": self.ok,
            "failed": self.failed, "completed_in_window": self.in_window,
            "dropped": self.dropped, "errors": self.errors,
            "throughput_rps": self.throughput, "rows_per_s": self.rows_per_s,
            "offered_rps": self.offered_rate,
            "latency_ms": self.latency_ms(), "send_lag_ms": self.lag_ms(),
            "generator_cpu_s": self.generator_cpu_s,
            "generator_cpu_us_per_request": self.cpu_us_per_request(self.generator_cpu_s),
            "watched_cpu_s": self.watched_cpu_s,
            "watched_cpu_us_per_request": self.cpu_us_per_request(self.watched_cpu_s),
            "connect_problems": self.connect_problems,
            "first_error": self.first_error,
        }


def _pname(percentile: float) -> str:
    return f"p{percentile:g}".replace(".", "")
