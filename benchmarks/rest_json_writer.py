"""The REST answer's JSON, new against old, in one process, no sockets: rest_json.
predict_response with the codec's writer (codec.json_numbers) against the same call with
it off (every output through numpy and orjson, as before), by dtype and value count.
Random values (float32 values of random mantissas need 8-9 digits, the writer's slowest
case) and the one-row answer of transport_floor.py (1.0). CPU time of this thread;
alternating rounds; medians of the per-round ratios. The crossover sets
rest_json.DIRECT_VALUES.

    PYTHONPATH=src .venv/bin/python benchmarks/rest_json_writer.py
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np
from timing import per_call_us

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.frontends import rest_json


def with_limit(limit: int, outputs: dict[str, Any]) -> bytes:
    """predict_response with the codec's writer for up to `limit` values (-1: off)."""
    saved = rest_json.DIRECT_VALUES
    rest_json.DIRECT_VALUES = limit
    try:
        return rest_json.predict_response(outputs, rest_json.ROW)
    finally:
        rest_json.DIRECT_VALUES = saved


def row(label: str, outputs: dict[str, Any], args: argparse.Namespace) -> None:
    def new() -> bytes:  # the compiled core's setting, whichever core is in use
        return with_limit(16, outputs)

    def old() -> bytes:
        return with_limit(-1, outputs)

    assert new() == old()
    old_us, new_us, ratios = [], [], []
    for _ in range(args.rounds):
        a, b = per_call_us(old, args.calls), per_call_us(new, args.calls)
        old_us.append(a)
        new_us.append(b)
        ratios.append(b / a)
    print(f"{label:26} {statistics.median(old_us):8.2f} {statistics.median(new_us):8.2f}"
          f"  {statistics.median(ratios):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"core: {codec.IMPLEMENTATION}; new: the codec's writer up to 16 values "
          f"(DIRECT_VALUES is {rest_json.DIRECT_VALUES} with this core)")
    print(f"{'answer (row format)':26} {'old us':>8} {'new us':>8}  new/old")
    one = np.ones((1, 1), np.float32)
    row("float32 [[1.0]]", {"y": codec.Tensor(dtypes.DT_FLOAT, (1, 1), one.tobytes())}, args)
    for count in (1, 4, 16, 32):
        floats = rng.random((1, count), dtype=np.float32)
        ints = rng.integers(-(2**40), 2**40, (1, count))
        row(f"float32 x{count}, random",
            {"y": codec.Tensor(dtypes.DT_FLOAT, (1, count), floats.tobytes())}, args)
        row(f"int64 x{count}, random",
            {"y": codec.Tensor(dtypes.DT_INT64, (1, count), ints.tobytes())}, args)


if __name__ == "__main__":
    main()
