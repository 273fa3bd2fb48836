"""The REST path's own work for small calls, new against old, in one process, no sockets:

1. JSON -> tensor: the plain-Python packing (rest_json._small) against numpy's conversion
   (rest_json._fast_numpy) on the same parsed values, by dtype and value count;
2. the answer of a one-row float call (transport_floor.py's): codec.decode_predict_response
   against a protobuf parse with every output re-serialized through decode_tensor (the code
   before), with the compiled core and with the pure-Python one.

Alternating rounds; medians of the per-round ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/rest_json_small.py
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from typing import Any

from timing import per_call_us

from batchproxy import _core
from batchproxy.codec import _core_py, dtypes
from batchproxy.frontends import rest_json
from batchproxy.protos import predict_pb2


def ratio_rows(label: str, new: Callable[[], Any], old: Callable[[], Any], args: Any) -> None:
    new_us, old_us, ratios = [], [], []
    for _ in range(args.rounds):
        a = per_call_us(old, args.calls)
        b = per_call_us(new, args.calls)
        old_us.append(a)
        new_us.append(b)
        ratios.append(b / a)
    print(f"{label:24} {statistics.median(old_us):9.2f} {statistics.median(new_us):9.2f}"
          f"  {statistics.median(ratios):.2f}x")


def answers(args: Any) -> None:
    response = predict_pb2.PredictResponse()
    out = response.outputs["y"]
    out.dtype = dtypes.DT_FLOAT
    out.tensor_shape.dim.add(size=1)
    out.tensor_shape.dim.add(size=1)
    out.float_val.append(0.5)
    response.model_spec.name = "m"
    response.model_spec.version.value = 1
    data = response.SerializeToString()
    print("\nanswer of a one-row call   old us    new us  new/old")
    for name, core in (("compiled core", _core), ("pure-Python core", _core_py)):
        def old(core: Any = core) -> Any:
            resp = predict_pb2.PredictResponse.FromString(data)
            outputs = {n: core.decode_tensor(resp.outputs[n].SerializeToString())
                       for n in sorted(resp.outputs)}
            spec = resp.model_spec
            return outputs, spec.version.value if spec.HasField("version") else None

        def new(core: Any = core) -> Any:
            return core.decode_predict_response(data)

        assert {k: (t.dtype, t.shape, t.data) for k, t in old()[0].items()} == {
            k: (t.dtype, t.shape, t.data) for k, t in new()[0].items()}
        ratio_rows(name, new, old, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    rest_json.SMALL_TENSOR = 1 << 20  # measure past the cut-over too
    generators: dict[int, Callable[[], Any]] = {
        dtypes.DT_FLOAT: random.random,
        dtypes.DT_INT64: lambda: random.randint(-1000, 1000),
        dtypes.DT_INT8: lambda: random.randint(-100, 100),
    }
    print("dtype   values  numpy us  python us  python/numpy (median of rounds)")
    for dtype, gen in generators.items():
        for count in (1, 4, 16, 32, 64, 128):
            value = [[gen() for _ in range(count)]]  # one instance, as a one-row call sends
            array = rest_json._fast_numpy(value, dtype, False)
            small = rest_json._small(value, dtype)
            assert array is not None and small is not None
            assert small.data == array.tobytes() and small.shape == array.shape

            def numpy_path(value: Any = value, dtype: int = dtype) -> Any:
                array = rest_json._fast_numpy(value, dtype, False)
                assert array is not None
                return array.shape, array.tobytes()

            def python_path(value: Any = value, dtype: int = dtype) -> Any:
                return rest_json._small(value, dtype)

            numpy_us, python_us, ratios = [], [], []
            for _ in range(args.rounds):
                a = per_call_us(numpy_path, args.calls)
                b = per_call_us(python_path, args.calls)
                numpy_us.append(a)
                python_us.append(b)
                ratios.append(b / a)
            print(f"{dtypes.tf_name(dtype):7} {count:6} {statistics.median(numpy_us):9.2f}"
                  f" {statistics.median(python_us):10.2f}  {statistics.median(ratios):.2f}x")
    answers(args)


if __name__ == "__main__":
    main()
