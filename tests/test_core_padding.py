"""Padding a merged batch up to an allowed batch size, in both cores (fixture `core`): the
padding rows are copies of the last row sent, on the wire, and the two cores write the same
message."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchproxy.protos import predict_pb2, tensor_pb2

FLOAT, INT32, STRING = 1, 3, 7


def request(inputs: dict[str, tensor_pb2.TensorProto]) -> bytes:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    for name, tp in inputs.items():
        req.inputs[name].CopyFrom(tp)
    return req.SerializeToString()


def floats(rows: int, inner: int, base: float) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=FLOAT)
    tp.tensor_shape.dim.add(size=rows)
    tp.tensor_shape.dim.add(size=inner)
    tp.float_val.extend(base + i for i in range(rows * inner))
    return tp


def strings(rows: int, base: str) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=STRING)
    tp.tensor_shape.dim.add(size=rows)
    tp.string_val.extend(f"{base}{i}".encode() for i in range(rows))
    return tp


def test_pads_with_copies_of_the_last_row(core: ModuleType) -> None:
    a = core.decode_predict_request(request({"x": floats(2, 3, 0.0), "s": strings(2, "a")}))
    b = core.decode_predict_request(request({"x": floats(3, 3, 100.0), "s": strings(3, "b")}))
    merged = predict_pb2.PredictRequest.FromString(
        core.encode_predict_request([(a, 0, 2), (b, 0, 2)], 4))
    x = merged.inputs["x"]
    assert [d.size for d in x.tensor_shape.dim] == [8, 3]
    values = np.frombuffer(x.tensor_content, "<f4").reshape(8, 3)
    last = np.array([103.0, 104.0, 105.0], "<f4")  # row 1 of b: the last row sent
    assert (values[4:] == last).all()
    assert (values[3] == last).all() and (values[0] == [0.0, 1.0, 2.0]).all()
    s = merged.inputs["s"]
    assert [d.size for d in s.tensor_shape.dim] == [8]
    assert list(s.string_val) == [b"a0", b"a1", b"b0", b"b1"] + [b"b1"] * 4


def test_padding_skips_empty_pieces_and_refuses_nothing_to_copy(core: ModuleType) -> None:
    a = core.decode_predict_request(request({"x": floats(2, 1, 7.0)}))
    b = core.decode_predict_request(request({"x": floats(2, 1, 9.0)}))
    merged = predict_pb2.PredictRequest.FromString(
        core.encode_predict_request([(a, 0, 1), (b, 2, 2)], 2))
    assert np.frombuffer(merged.inputs["x"].tensor_content, "<f4").tolist() == [7.0] * 3
    with pytest.raises(core.CodecError):
        core.encode_predict_request([(a, 1, 1)], 1)
    with pytest.raises(core.CodecError):
        core.encode_predict_request([(a, 0, 1)], -1)


def test_padded_answer_splits_back_without_the_padding(core: ModuleType) -> None:
    a = core.decode_predict_request(request({"x": floats(3, 2, 1.0)}))
    merged = predict_pb2.PredictRequest.FromString(core.encode_predict_request([(a, 0, 3)], 5))
    resp = predict_pb2.PredictResponse()
    resp.outputs["y"].CopyFrom(merged.inputs["x"])
    parts = core.split_predict_response(resp.SerializeToString(), [1, 2, 5])
    first = predict_pb2.PredictResponse.FromString(parts[0]).outputs["y"]
    second = predict_pb2.PredictResponse.FromString(parts[1]).outputs["y"]
    assert np.frombuffer(first.tensor_content, "<f4").tolist() == [1.0, 2.0]
    assert np.frombuffer(second.tensor_content, "<f4").tolist() == [3.0, 4.0, 5.0, 6.0]


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=4), pad=st.integers(0, 9),
       inner=st.integers(0, 3))
def test_both_cores_pad_alike(both_cores: tuple[ModuleType, ModuleType], rows: list[int],
                              pad: int, inner: int) -> None:
    encoded = []
    for core in both_cores:
        calls = [core.decode_predict_request(request({
            "x": floats(r, inner, 10.0 * i), "s": strings(r, str(i)),
            "n": _ints(r, i)})) for i, r in enumerate(rows)]
        encoded.append(core.encode_predict_request([(c, 0, c.rows) for c in calls], pad))
    # Compared as messages: the cores may order fields differently, never differ in content.
    merged = predict_pb2.PredictRequest.FromString(encoded[0])
    assert merged == predict_pb2.PredictRequest.FromString(encoded[1])
    assert merged.inputs["n"].tensor_shape.dim[0].size == sum(rows) + pad


def _ints(rows: int, base: int) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=INT32)
    tp.tensor_shape.dim.add(size=rows)
    tp.int_val.extend(base * 100 + i for i in range(rows))
    return tp


def test_pad_length_pads_dimension_one_after_each_row(core: ModuleType) -> None:
    ints = core.Tensor(INT32, (2, 2, 1), np.array([1, 2, 3, 4], "<i4").tobytes())
    padded = core.pad_length(ints, 4, np.array([9], "<i4").tobytes())
    assert padded.shape == (2, 4, 1)
    assert np.frombuffer(padded.data, "<i4").tolist() == [1, 2, 9, 9, 3, 4, 9, 9]
    assert core.pad_length(ints, 2, bytes(4)) is ints
    words = core.Tensor(STRING, (2, 1), [b"a", b"b"])
    assert core.pad_length(words, 2, b"<pad>").data == [b"a", b"<pad>", b"b", b"<pad>"]
    for bad in ((ints, 1, bytes(4)), (ints, 3, bytes(2)),
                (core.Tensor(INT32, (2,), bytes(8)), 3, bytes(4))):
        with pytest.raises(core.CodecError):
            core.pad_length(*bad)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 4), length=st.integers(0, 4), extra=st.integers(0, 4),
       inner=st.integers(1, 3))
def test_both_cores_pad_lengths_alike(both_cores: tuple[ModuleType, ModuleType], rows: int,
                                      length: int, extra: int, inner: int) -> None:
    data = np.arange(rows * length * inner, dtype="<f4").tobytes()
    results = [core.pad_length(core.Tensor(FLOAT, (rows, length, inner), data),
                               length + extra, np.array([-1], "<f4").tobytes())
               for core in both_cores]
    assert results[0].shape == results[1].shape == (rows, length + extra, inner)
    assert results[0].data == results[1].data
