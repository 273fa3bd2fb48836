"""Writes the fuzz seeds: small serialized PredictRequests (requests/*.bin) and
PredictResponses (responses/*.bin) covering every encoding the codec reads.

    .venv/bin/python tests/fuzz_corpus/make_corpus.py

Deterministic (fixed seeds), built with the generated protobuf classes or by hand on the
wire, never with the codec under test. The files are committed; tests/test_fuzz.py runs
each through decode and split and mutates them. Rerun after changing this script, and
commit what changes. A few seeds are deliberately hostile (names starting `bad_`): the
mutations then start near the edges as well as from valid input.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for wire.py

from wire import ld, tag, varint

from batchproxy.protos import model_pb2, predict_pb2, tensor_pb2

HERE = Path(__file__).resolve().parent

# dtype: (numpy element, typed field), for the dtypes the core batches.
DTYPES = {
    1: ("<f4", "float_val"),
    2: ("<f8", "double_val"),
    3: ("<i4", "int_val"),
    4: ("u1", "int_val"),
    5: ("<i2", "int_val"),
    6: ("i1", "int_val"),
    8: ("<c8", "scomplex_val"),
    9: ("<i8", "int64_val"),
    10: ("?", "bool_val"),
    14: ("<u2", "half_val"),
    17: ("<u2", "int_val"),
    18: ("<c16", "dcomplex_val"),
    19: ("<u2", "half_val"),
    22: ("<u4", "uint32_val"),
    23: ("<u8", "uint64_val"),
}


def tensor(dtype: int, shape: tuple[int, ...], values, typed: bool) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=dtype)
    tp.tensor_shape.SetInParent()
    for d in shape:
        tp.tensor_shape.dim.add(size=d)
    if dtype == 7:
        tp.string_val.extend(values)
        return tp
    element, field = DTYPES[dtype]
    arr = np.asarray(values, dtype=element)
    if not typed:
        tp.tensor_content = arr.tobytes()
    elif field in ("scomplex_val", "dcomplex_val"):
        getattr(tp, field).extend(arr.view(arr.real.dtype).tolist())
    else:
        getattr(tp, field).extend(arr.ravel().tolist())
    return tp


def request(inputs: dict[str, tensor_pb2.TensorProto], **spec) -> bytes:
    """Entry by entry, so the wire order is the dict's."""
    head = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(**spec))
    out = head.SerializeToString()
    for name, tp in inputs.items():
        out += predict_pb2.PredictRequest(inputs={name: tp}).SerializeToString()
    return out


def response(outputs: dict[str, tensor_pb2.TensorProto], spec: bool = True) -> bytes:
    out = b"".join(
        predict_pb2.PredictResponse(outputs={k: v}).SerializeToString() for k, v in outputs.items()
    )
    if spec:
        out += ld(2, model_pb2.ModelSpec(name="m", signature_name="serving_default")
                  .SerializeToString())
    return out


def values(dtype: int, n: int, rng: np.random.Generator):
    if dtype == 7:
        return [rng.bytes(int(rng.integers(0, 5))) for _ in range(n)]
    element = np.dtype(DTYPES[dtype][0])
    if element.kind == "c":
        return rng.standard_normal(n) + 1j * rng.standard_normal(n)
    if element.kind == "f":
        return rng.standard_normal(n)
    if element.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    info = np.iinfo(element)
    return rng.integers(info.min, info.max, n, dtype=element, endpoint=True)


def seeds() -> tuple[dict[str, bytes], dict[str, bytes]]:
    rng = np.random.default_rng(20240601)
    reqs: dict[str, bytes] = {}
    resps: dict[str, bytes] = {}
    for dtype in [*DTYPES, 7]:
        for typed in (True, False) if dtype != 7 else (True,):
            kind = "typed" if typed else "content"
            tp = tensor(dtype, (2, 3), values(dtype, 6, rng), typed)
            reqs[f"dtype{dtype}_{kind}"] = request({"x": tp}, name="m", signature_name="s")
            resps[f"dtype{dtype}_{kind}"] = response({"y": tp})
    x = tensor(1, (3, 2), values(1, 6, rng), False)
    # Requests: the model spec's forms, filters, several inputs, the fill rule, strings.
    reqs["version"] = request({"x": x}, name="m", version={"value": 7})
    reqs["label_and_filter"] = request({"x": x}, name="m", version_label="canary") + ld(3, b"y")
    reqs["no_model_spec"] = predict_pb2.PredictRequest(inputs={"x": x}).SerializeToString()
    reqs["two_inputs"] = request(
        {"x": x, "s": tensor(7, (3,), [b"a", b"bc", b""], True)}, name="m"
    )
    reqs["one_value_fills"] = request({"x": tensor(1, (4, 5), [1.5], True)}, name="m")
    reqs["fewer_values_repeat"] = request({"x": tensor(3, (2, 3), [1, -2], True)}, name="m")
    reqs["no_values_zeros"] = request({"x": tensor(9, (2, 2), [], True)}, name="m")
    reqs["zero_rows"] = request({"x": tensor(1, (0, 3), [], False)}, name="m")
    reqs["scalar"] = request({"x": tensor(1, (), [2.0], True)}, name="m")
    strings = [b"a", b"", b"xyz"]
    content = b"".join(varint(len(s)) for s in strings) + b"".join(strings)
    reqs["string_content"] = request(
        {"s": tensor_pb2.TensorProto(dtype=7, tensor_content=content,
                                     tensor_shape={"dim": [{"size": 3}]})},
        name="m",
    )
    reqs["variant_unbatchable"] = request(
        {"v": tensor_pb2.TensorProto(dtype=21, variant_val=[b"\x0a\x01v"],
                                     tensor_shape={"dim": [{"size": 1}]})},
        name="m",
    )
    # Hand-written wire forms: unpacked values, split packed records, unknown fields and a
    # group, a value record split in two (protobuf merges), a padded varint.
    shape = ld(2, ld(2, tag(1, 0) + varint(2)) + ld(2, tag(1, 0) + varint(2)))
    unpacked = tag(1, 0) + varint(3) + shape + b"".join(tag(7, 0) + varint(v) for v in (1, -1, 5))
    reqs["unpacked_int_val"] = ld(1, ld(1, b"m")) + ld(2, ld(1, b"x") + ld(2, unpacked))
    split_packed = tag(1, 0) + varint(1) + shape + ld(5, struct.pack("<2f", 1, 2)) + ld(
        5, struct.pack("<2f", 3, 4)
    )
    reqs["split_packed"] = ld(1, ld(1, b"m")) + ld(2, ld(1, b"x") + ld(2, split_packed))
    junk = tag(900, 0) + varint(-1) + tag(901, 1) + bytes(8) + tag(99, 3) + tag(1, 0) + b"\x01" \
        + tag(99, 4) + tag(903, 5) + bytes(4)
    reqs["unknown_fields"] = junk + ld(1, junk + ld(1, b"m")) + ld(
        2, junk + ld(1, b"x") + ld(2, junk + split_packed)
    )
    reqs["merged_value_records"] = ld(1, ld(1, b"m")) + ld(
        2, ld(1, b"x") + ld(2, tag(1, 0) + varint(1) + shape) + ld(2, ld(5, bytes(16)))
    )
    reqs["padded_varint"] = ld(1, ld(1, b"m")) + ld(
        2, ld(1, b"x") + ld(2, tag(1, 0) + b"\x83\x80\x00" + ld(2, ld(2, tag(1, 0) + b"\x81\x00"))
                            + ld(7, b"\x85\x80\x00"))
    )
    # Hostile seeds.
    reqs["bad_negative_dim"] = request({"x": tensor(1, (2, -1), [1.0], True)}, name="m")
    reqs["bad_huge_dims"] = request({"x": tensor(1, (2**40, 2**40), [1.0], True)}, name="m")
    reqs["bad_unknown_dtype"] = request(
        {"x": tensor_pb2.TensorProto(dtype=77, tensor_shape={"dim": [{"size": 1}]})}, name="m"
    )
    reqs["bad_duplicate_key"] = ld(2, ld(1, b"x") + ld(2, unpacked)) * 2
    reqs["bad_padded_tag"] = ld(2, ld(1, b"x") + ld(2, b"\x88\x80\x80\x80\x80\x00\x01"))
    reqs["bad_first_key_not_utf8"] = ld(2, ld(1, b"\xed") + ld(1, b"x") + ld(2, unpacked))
    reqs["bad_content_length"] = request(
        {"x": tensor_pb2.TensorProto(dtype=1, tensor_content=bytes(7),
                                     tensor_shape={"dim": [{"size": 2}]})},
        name="m",
    )
    # Responses: several outputs, fill forms, names on dims, no model spec.
    y = tensor(1, (3, 2), values(1, 6, rng), True)
    y.tensor_shape.dim[0].name = "batch"
    resps["several_outputs"] = response(
        {"y": y, "s": tensor(7, (3,), [b"p", b"", b"qq"], True),
         "i": tensor(9, (3,), values(9, 3, rng), False)}
    )
    resps["one_value_form"] = response({"y": tensor(1, (4, 2), [2.5], True)})
    resps["partial_fill"] = response({"y": tensor(3, (4,), [1, 2], True)})
    resps["no_values"] = response({"y": tensor(2, (4, 1), [], True)})
    resps["no_model_spec"] = response({"y": y}, spec=False)
    resps["string_content"] = response(
        {"s": tensor_pb2.TensorProto(dtype=7, tensor_content=content,
                                     tensor_shape={"dim": [{"size": 3}]})}
    )
    resps["unpacked_and_junk"] = ld(1, junk + ld(1, b"y") + ld(2, junk + unpacked)) + junk
    resps["bad_unknown_dim"] = response({"y": tensor(1, (-1, 2), [1.0], True)})
    resps["bad_huge_inner"] = response({"y": tensor(1, (4, 2**40, 2**40), [1.0], True)})
    return reqs, resps


def main() -> None:
    reqs, resps = seeds()
    for folder, table in (("requests", reqs), ("responses", resps)):
        out = HERE / folder
        out.mkdir(exist_ok=True)
        for old in out.glob("*.bin"):
            old.unlink()
        for name, data in table.items():
            (out / f"{name}.bin").write_bytes(data)
    print(f"{len(reqs)} requests, {len(resps)} responses in {HERE}")


if __name__ == "__main__":
    main()
