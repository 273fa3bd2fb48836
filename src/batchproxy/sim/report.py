"""Figures of a simulation: latency percentiles, goodput inside the SLO, errors by code,
what the replicas received and how busy they were; as a table and as JSON.

Every float is rounded and keys are sorted, so one seed gives byte-identical JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchproxy.sim.replicas import ReplicaRecord

OK = "OK"


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass
class Outcomes:
    """How each call of one run ended: seconds from arrival to answer, and a gRPC code name."""

    latencies_s: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    end_s: float = 0.0  # virtual time when the last call was answered

    def only(self, keep: list[bool]) -> Outcomes:
        """The calls whose `keep` is true (the measured ones, after a warm-up)."""
        if all(keep):
            return self
        return Outcomes([x for x, k in zip(self.latencies_s, keep, strict=True) if k],
                        [c for c, k in zip(self.codes, keep, strict=True) if k], self.end_s)


@dataclass
class RunResult:
    system: str
    rate_per_s: float
    load: float | None
    duration_s: float
    requests: int
    ok: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    mean_ms: float | None
    goodput_per_s: float
    inside_slo: float | None  # share of the measured calls answered OK within the SLO
    errors: dict[str, int]
    mean_batch_rows: float
    batches: int
    batch_rows: dict[str, int]
    utilization: list[float]
    mean_utilization: float
    end_s: float
    # With a sheddable share: each priority class's figures (`by_priority`).
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, system: str, rate: float, load: float | None, duration_s: float,
           slo_s: float, outcomes: Outcomes, records: Sequence[ReplicaRecord],
           concurrency: int, busy_window_s: float | None = None) -> RunResult:
        """`busy_window_s`: the span the replicas' busy time covers (warm-up included);
        `duration_s` by default."""
        ok = sorted(lat for lat, code in zip(outcomes.latencies_s, outcomes.codes, strict=True)
                    if code == OK)
        good = sum(1 for lat in ok if lat <= slo_s)
        errors = Counter(code for code in outcomes.codes if code != OK)
        histogram: Counter[int] = Counter()
        for record in records:
            histogram.update(record.batch_rows)
        batches = sum(histogram.values())
        rows = sum(r * n for r, n in histogram.items())
        window = busy_window_s or duration_s
        utilization = [round(rec.busy_s / (concurrency * window), 4) if window else 0.0
                       for rec in records]
        return cls(
            system=system, rate_per_s=round(rate, 3),
            load=None if load is None else round(load, 4),
            duration_s=round(duration_s, 6), requests=len(outcomes.codes), ok=len(ok),
            p50_ms=_ms(percentile(ok, 0.5)), p90_ms=_ms(percentile(ok, 0.9)),
            p99_ms=_ms(percentile(ok, 0.99)), p999_ms=_ms(percentile(ok, 0.999)),
            mean_ms=_ms(math.fsum(ok) / len(ok)) if ok else None,
            goodput_per_s=round(good / duration_s, 3) if duration_s else 0.0,
            inside_slo=round(good / len(outcomes.codes), 6) if outcomes.codes else None,
            errors=dict(sorted(errors.items())),
            mean_batch_rows=round(rows / batches, 3) if batches else 0.0,
            batches=batches,
            batch_rows={str(r): histogram[r] for r in sorted(histogram)},
            utilization=utilization,
            mean_utilization=round(sum(utilization) / len(utilization), 4)
            if utilization else 0.0,
            end_s=round(outcomes.end_s, 6))

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        if not self.classes:
            del data["classes"]  # runs without priorities read as they always did
        return data


def class_figures(outcomes: Outcomes, duration_s: float, slo_s: float) -> dict[str, Any]:
    """One priority class: calls, answered OK, p99, goodput, and the share of its calls
    answered OK inside the SLO (of all it sent, refused ones included)."""
    ok = sorted(lat for lat, code in zip(outcomes.latencies_s, outcomes.codes, strict=True)
                if code == OK)
    good = sum(1 for lat in ok if lat <= slo_s)
    requests = len(outcomes.codes)
    return {"requests": requests, "ok": len(ok), "p99_ms": _ms(percentile(ok, 0.99)),
            "goodput_per_s": round(good / duration_s, 3) if duration_s else 0.0,
            "inside_slo": round(good / requests, 4) if requests else None,
            "errors": dict(sorted(Counter(c for c in outcomes.codes if c != OK).items()))}


def by_priority(outcomes: Outcomes, sheddable: list[bool], duration_s: float,
                slo_s: float) -> dict[str, dict[str, Any]]:
    """Figures per class; `sheddable[i]` says which class call i was sent in."""
    return {"critical": class_figures(outcomes.only([not s for s in sheddable]),
                                      duration_s, slo_s),
            "sheddable": class_figures(outcomes.only(sheddable), duration_s, slo_s)}


@dataclass
class SimReport:
    config: dict[str, Any]
    runs: list[RunResult]
    capacity_rows_per_s: float

    def run(self, system: str, rate: float | None = None) -> RunResult:
        for result in self.runs:
            if result.system == system and (rate is None
                                            or result.rate_per_s == round(rate, 3)):
                return result
        raise KeyError(f"no run of {system!r} at rate {rate}")

    def to_json(self) -> str:
        data = {"capacity_rows_per_s": round(self.capacity_rows_per_s, 3),
                "config": self.config, "runs": [r.to_dict() for r in self.runs]}
        return json.dumps(data, sort_keys=True, indent=2) + "\n"

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def table(self) -> str:
        return format_table(self.runs)


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _buckets(batch_rows: dict[str, int]) -> str:
    """Rows per batch in power-of-two buckets: `<=1:5 <=2:9 ...`."""
    buckets: Counter[int] = Counter()
    for rows, count in batch_rows.items():
        buckets[1 << max(0, int(rows) - 1).bit_length()] += count
    return " ".join(f"<={b}:{buckets[b]}" for b in sorted(buckets)) or "-"


def format_table(runs: Sequence[RunResult]) -> str:
    header = ("system", "rate/s", "load", "calls", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
              "goodput/s", "errors", "rows/batch", "util")
    rows = [header]
    for r in runs:
        rows.append((r.system, f"{r.rate_per_s:.0f}", _cell(r.load, 2), str(r.requests),
                     _cell(r.p50_ms), _cell(r.p90_ms), _cell(r.p99_ms), _cell(r.p999_ms),
                     f"{r.goodput_per_s:.1f}", str(sum(r.errors.values())),
                     f"{r.mean_batch_rows:.1f}", f"{r.mean_utilization:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    details = []
    for r in runs:
        errors = ", ".join(f"{code}={n}" for code, n in r.errors.items()) or "none"
        util = " ".join(f"{u:.2f}" for u in r.utilization)
        details.append(f"{r.system} @ {r.rate_per_s:.0f}/s: errors {errors}; "
                       f"batch rows {_buckets(r.batch_rows)}; utilization {util}")
        for name, c in r.classes.items():
            refused = ", ".join(f"{code}={n}" for code, n in c["errors"].items()) or "none"
            inside = "-" if c["inside_slo"] is None else f"{100 * c['inside_slo']:.2f} %"
            details.append(f"  {name}: {c['requests']} calls, {inside} inside the SLO, "
                           f"p99 {_cell(c['p99_ms'])} ms, goodput {c['goodput_per_s']:.1f}/s; "
                           f"errors {refused}")
    return "\n".join([*lines, "", *details])
