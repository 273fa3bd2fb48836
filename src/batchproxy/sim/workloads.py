"""Workloads: when calls arrive, for which model, with how many rows and which deadline.

A workload is a list of `Arrival`s, made before the run from its own seeded generator, so
every system compared in one simulation sees the very same calls. Each distinct (model,
rows) is a `Shape` whose serialized PredictRequest is built once; the proxy decodes it per
call, as its frontend would.

- poisson: exponential gaps at `rate` calls/s.
- bursts: on/off; Poisson at `rate * (on + off) / on` while on, nothing while off, so the
  mean offered load is still `rate`.
- trace: replayed from a CSV file with the columns time_s, rows, model, deadline_ms (an
  empty deadline_ms: no deadline).

Any of them may send a share of its calls as sheddable (`mark_sheddable`), drawn from a
generator of its own, so the arrivals themselves stay those of the same seed.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from batchproxy.protos import predict_pb2

DT_FLOAT = 1
SIGNATURE = "serving_default"


class Arrival(NamedTuple):
    time_s: float
    shape: int  # index into the workload's shapes
    deadline_s: float | None
    sheddable: bool = False  # the proxy's priority class; critical when false


@dataclass(frozen=True)
class Shape:
    model: str
    rows: int
    request: bytes


def predict_request(model: str, rows: int, features: int) -> bytes:
    """A PredictRequest of one float32 input `x` of [rows, features], as tensor_content (what
    tf.make_tensor_proto sends); row r holds r + column/1000 so answers can be checked."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = SIGNATURE
    tensor = request.inputs["x"]
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.add(size=rows)
    tensor.tensor_shape.dim.add(size=features)
    values = np.arange(rows, dtype="<f4")[:, None] + np.arange(features, dtype="<f4") / 1000
    tensor.tensor_content = values.astype("<f4").tobytes()
    return request.SerializeToString()


@dataclass(frozen=True)
class Mix:
    """What one call looks like: weighted choices of model and rows, one deadline."""

    models: tuple[tuple[str, float], ...] = (("model", 1.0),)
    rows: tuple[tuple[int, float], ...] = ((1, 1.0),)
    deadline_s: float | None = None

    def mean_rows(self) -> float:
        total = sum(w for _, w in self.rows)
        return sum(r * w for r, w in self.rows) / total


def parse_weighted(text: str, kind: type) -> tuple[tuple, ...]:
    """`a,b:3,c` -> ((a, 1), (b, 3), (c, 1)); for int kinds `A-B` means every value A..B."""
    items: list[tuple] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        w = float(weight) if weight else 1.0
        if w <= 0:
            raise ValueError(f"{part!r}: weights must be positive")
        if kind is int and "-" in name:
            low, high = (int(x) for x in name.split("-"))
            items.extend((r, w) for r in range(low, high + 1))
        else:
            items.append((kind(name), w))
    if not items:
        raise ValueError(f"{text!r}: nothing to choose from")
    if kind is int and any(value < 1 for value, _ in items):
        raise ValueError(f"{text!r}: a call has at least one row")
    return tuple(items)


class ShapeTable:
    """The distinct (model, rows) of a workload, each with its request bytes."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.shapes: list[Shape] = []
        self._index: dict[tuple[str, int], int] = {}

    def index(self, model: str, rows: int) -> int:
        key = (model, rows)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = len(self.shapes)
            self.shapes.append(Shape(model, rows, predict_request(model, rows, self.features)))
        return found

    def models(self) -> list[str]:
        return sorted({shape.model for shape in self.shapes})


def _chooser(rng: random.Random, choices: Sequence[tuple]) -> Callable[[], Any]:
    values = [value for value, _ in choices]
    weights = [weight for _, weight in choices]
    if len(values) == 1:
        only = values[0]
        return lambda: only
    cum: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    return lambda: rng.choices(values, cum_weights=cum)[0]


def _draw(times: list[float], mix: Mix, table: ShapeTable,
          rng: random.Random) -> list[Arrival]:
    model = _chooser(rng, mix.models)
    rows = _chooser(rng, mix.rows)
    return [Arrival(t, table.index(model(), rows()), mix.deadline_s) for t in times]


def poisson_times(rate: float, duration_s: float, rng: random.Random,
                  start_s: float = 0.0) -> list[float]:
    times: list[float] = []
    if rate <= 0:
        return times
    t = start_s + rng.expovariate(rate)
    end = start_s + duration_s
    while t < end:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def poisson(rate: float, duration_s: float, mix: Mix, table: ShapeTable,
            seed: int) -> list[Arrival]:
    rng = random.Random(f"{seed}:poisson")
    return _draw(poisson_times(rate, duration_s, rng), mix, table, rng)


def bursts(rate: float, duration_s: float, mix: Mix, table: ShapeTable, seed: int,
           on_s: float = 1.0, off_s: float = 1.0) -> list[Arrival]:
    if on_s <= 0 or off_s < 0:
        raise ValueError("bursts need on_s > 0 and off_s >= 0")
    rng = random.Random(f"{seed}:bursts")
    peak = rate * (on_s + off_s) / on_s
    times: list[float] = []
    start = 0.0
    while start < duration_s:
        times.extend(poisson_times(peak, min(on_s, duration_s - start), rng, start))
        start += on_s + off_s
    return _draw(times, mix, table, rng)


def mark_sheddable(arrivals: list[Arrival], share: float, seed: int) -> list[Arrival]:
    """The same calls, each sheddable with probability `share`."""
    if share <= 0:
        return arrivals
    rng = random.Random(f"{seed}:sheddable")
    return [arrival._replace(sheddable=rng.random() < share) for arrival in arrivals]


def read_trace(path: str | Path, table: ShapeTable) -> list[Arrival]:
    arrivals: list[Arrival] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"time_s", "rows", "model"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"trace {path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                deadline = (row.get("deadline_ms") or "").strip()
                arrivals.append(Arrival(
                    float(row["time_s"]),
                    table.index(row["model"].strip(), int(row["rows"])),
                    float(deadline) / 1000 if deadline and float(deadline) > 0 else None))
            except ValueError as err:
                raise ValueError(f"trace {path}, line {line}: {err}") from None
    arrivals.sort(key=lambda a: a.time_s)  # stable: equal times keep file order
    if any(table.shapes[a.shape].rows < 1 for a in arrivals):
        raise ValueError(f"trace {path}: a call has at least one row")
    return arrivals
