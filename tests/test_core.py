"""The wire codec, run against both cores (fixture `core` in conftest.py).

Test data is built with the generated protobuf classes or with the hand-written wire helpers
below, never with the codec under test, and everything the codec writes is read back with
protobuf: the two implementations of the format check each other.
"""

from __future__ import annotations

import math
import struct
from datetime import timedelta
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import ld, tag, varint

from batchproxy.protos import model_pb2, predict_pb2, tensor_pb2

# --- DataType ---------------------------------------------------------------------------

FLOAT, DOUBLE, INT32, UINT8, INT16, INT8, STRING, COMPLEX64, INT64, BOOL = range(1, 11)
QINT8, QUINT8, QINT32, BFLOAT16, QINT16, QUINT16, UINT16, COMPLEX128, HALF = range(11, 20)
RESOURCE, VARIANT, UINT32, UINT64 = 20, 21, 22, 23

# numpy dtype of one normalized element.
NP = {
    FLOAT: np.dtype("<f4"),
    DOUBLE: np.dtype("<f8"),
    INT32: np.dtype("<i4"),
    UINT8: np.dtype("u1"),
    INT16: np.dtype("<i2"),
    INT8: np.dtype("i1"),
    COMPLEX64: np.dtype("<c8"),
    INT64: np.dtype("<i8"),
    BOOL: np.dtype("u1"),
    QINT8: np.dtype("i1"),
    QUINT8: np.dtype("u1"),
    QINT32: np.dtype("<i4"),
    BFLOAT16: np.dtype("<u2"),
    QINT16: np.dtype("<i2"),
    QUINT16: np.dtype("<u2"),
    UINT16: np.dtype("<u2"),
    COMPLEX128: np.dtype("<c16"),
    HALF: np.dtype("<u2"),
    UINT32: np.dtype("<u4"),
    UINT64: np.dtype("<u8"),
}
NUMERIC = sorted(NP)
ALL_DTYPES = [*NUMERIC, STRING]
FIELD = {
    FLOAT: "float_val",
    DOUBLE: "double_val",
    COMPLEX64: "scomplex_val",
    COMPLEX128: "dcomplex_val",
    INT64: "int64_val",
    BOOL: "bool_val",
    HALF: "half_val",
    BFLOAT16: "half_val",
    UINT32: "uint32_val",
    UINT64: "uint64_val",
    STRING: "string_val",
}
for _dt in (INT32, UINT8, INT16, INT8, QINT8, QUINT8, QINT32, QINT16, QUINT16, UINT16):
    FIELD[_dt] = "int_val"
FIELD_NUMBER = {
    "float_val": 5,
    "double_val": 6,
    "int_val": 7,
    "string_val": 8,
    "scomplex_val": 9,
    "int64_val": 10,
    "bool_val": 11,
    "dcomplex_val": 12,
    "half_val": 13,
    "uint32_val": 16,
    "uint64_val": 17,
}
FIXED = {"float_val": "<f4", "double_val": "<f8", "scomplex_val": "<f4", "dcomplex_val": "<f8"}


# --- hand-written wire format (independent of both cores) -------------------------------


def shape_bytes(dims: tuple[int, ...]) -> bytes:
    return ld(2, b"".join(ld(2, tag(1, 0) + varint(d)) for d in dims))


# --- test data --------------------------------------------------------------------------


def make_array(dtype: int, shape: tuple[int, ...], rng: np.random.Generator):
    """Random elements for `dtype`: an ndarray of normalized elements, or a list of bytes."""
    n = math.prod(shape)
    if dtype == STRING:
        return [rng.bytes(int(rng.integers(0, 6))) for _ in range(n)]
    if dtype in (FLOAT, DOUBLE):
        # Finite values: NaN != NaN would only obscure the comparisons.
        return (rng.standard_normal(n) * 100).astype(NP[dtype]).reshape(shape)
    if dtype in (COMPLEX64, COMPLEX128):
        return (
            (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(NP[dtype]).reshape(shape)
        )
    if dtype == BOOL:
        return rng.integers(0, 2, n).astype(np.uint8).reshape(shape)
    if dtype == HALF:
        return rng.standard_normal(n).astype("<f2").view("<u2").reshape(shape)
    info = np.iinfo(NP[dtype])
    return rng.integers(info.min, info.max, n, dtype=NP[dtype], endpoint=True).reshape(shape)


def elements(dtype: int, arr) -> bytes | list[bytes]:
    """The normalized payload the core's Tensor.data should hold."""
    if dtype == STRING:
        return list(arr)
    return np.ascontiguousarray(arr, dtype=NP[dtype]).tobytes()


def typed_values(dtype: int, arr) -> list:
    """What a TFS client puts in the dtype's typed field."""
    if dtype == STRING:
        return list(arr)
    flat = np.asarray(arr).ravel()
    if dtype in (COMPLEX64, COMPLEX128):
        return flat.view(FIXED[FIELD[dtype]]).tolist()
    if dtype == BOOL:
        return [bool(v) for v in flat]
    return flat.tolist()  # int_val takes the narrow types sign- or zero-extended


def tensor_proto(dtype: int, shape: tuple[int, ...], arr, typed: bool) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=dtype)
    tp.tensor_shape.SetInParent()
    for d in shape:
        tp.tensor_shape.dim.add(size=d)
    if typed or dtype == STRING:
        getattr(tp, FIELD[dtype]).extend(typed_values(dtype, arr))
    else:
        tp.tensor_content = elements(dtype, arr)
    return tp


def request_bytes(
    inputs: dict[str, tensor_pb2.TensorProto],
    name: str = "m",
    version: int | None = None,
    label: str | None = None,
    signature: str = "",
    output_filter: tuple[str, ...] = (),
) -> bytes:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    req.model_spec.signature_name = signature
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(v)
    req.output_filter.extend(output_filter)
    return req.SerializeToString()


def response_bytes(outputs: dict[str, tensor_pb2.TensorProto], spec_name: str = "m") -> bytes:
    # Entry by entry, so the wire order is the dict's order.
    resp = b"".join(
        predict_pb2.PredictResponse(outputs={k: v}).SerializeToString() for k, v in outputs.items()
    )
    return resp + ld(2, model_pb2.ModelSpec(name=spec_name).SerializeToString())


def pb_elements(tp: tensor_pb2.TensorProto) -> bytes | list[bytes]:
    """Normalized payload of a TensorProto read with protobuf (full form only)."""
    if tp.dtype == STRING:
        return list(tp.string_val)
    if tp.tensor_content:
        return tp.tensor_content
    values = list(getattr(tp, FIELD[tp.dtype]))
    dtype = NP[tp.dtype]
    if tp.dtype in (COMPLEX64, COMPLEX128):
        return np.array(values, dtype=FIXED[FIELD[tp.dtype]]).tobytes()
    if tp.dtype == BOOL:
        return np.array(values, dtype=bool).astype(np.uint8).tobytes()
    if dtype.kind in "iu":  # wrap through uint64, as a C cast would
        return np.array([v % 2**64 for v in values], np.uint64).astype(dtype).tobytes()
    return np.array(values, dtype).tobytes()


def dims(tp: tensor_pb2.TensorProto) -> tuple[int, ...]:
    return tuple(d.size for d in tp.tensor_shape.dim)


def rows_of(dtype: int, data, inner: tuple[int, ...], start: int, stop: int):
    per = math.prod(inner)
    if dtype == STRING:
        return data[start * per : stop * per]
    size = NP[dtype].itemsize * per
    return data[start * size : stop * size]


def canon(data: bytes, cls=predict_pb2.PredictResponse) -> bytes:
    """Serialized bytes in protobuf's deterministic form, for comparing semantics."""
    return cls.FromString(data).SerializeToString(deterministic=True)


# --- itemsize -----------------------------------------------------------------------------


def test_itemsize(core: ModuleType) -> None:
    for dtype in NUMERIC:
        assert core.itemsize(dtype) == NP[dtype].itemsize
    assert core.itemsize(STRING) == 0
    for dtype in (0, RESOURCE, VARIANT, 24, 101, -1, 1 << 40):
        assert core.itemsize(dtype) == -1


# --- single tensors -----------------------------------------------------------------------


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "content"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_tensor_round_trip(core: ModuleType, dtype: int, typed: bool) -> None:
    rng = np.random.default_rng(dtype)
    shape = (3, 2)
    arr = make_array(dtype, shape, rng)
    want = elements(dtype, arr)

    # protobuf-built bytes -> core
    t = core.decode_tensor(tensor_proto(dtype, shape, arr, typed).SerializeToString())
    assert (t.dtype, t.shape, t.data) == (dtype, shape, want)

    # core-built bytes -> protobuf
    tp = tensor_pb2.TensorProto.FromString(core.encode_tensor(dtype, shape, want, typed))
    assert tp.dtype == dtype and dims(tp) == shape
    if typed or dtype == STRING:
        assert tp.WhichOneof is not None and not tp.tensor_content
        assert getattr(tp, FIELD[dtype]) == typed_values(dtype, arr)
    else:
        assert tp.tensor_content == want
    assert pb_elements(tp) == want
    assert core.decode_tensor(tp.SerializeToString()).data == want


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_tensor_scalar_and_empty(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(0)
    for shape in [(), (0,), (2, 0, 3)]:
        arr = make_array(dtype, shape, rng)
        for typed in (True, False):
            data = core.encode_tensor(dtype, shape, elements(dtype, arr), typed)
            t = core.decode_tensor(data)
            assert (t.dtype, t.shape, t.data) == (dtype, shape, elements(dtype, arr))


def test_negative_int_val_is_ten_byte_varint(core: ModuleType) -> None:
    data = core.encode_tensor(INT32, (2,), np.array([-1, 5], "<i4").tobytes(), True)
    assert ld(7, b"\xff" * 9 + b"\x01" + b"\x05") in data
    for dtype, values in [
        (INT8, [-128, -1, 0, 127]),
        (INT16, [-32768, -2, 32767, 1]),
        (INT32, [-(2**31), -1, 2**31 - 1, 0]),
        (QINT32, [-7, 7, 0, -(2**31)]),
        (INT64, [-(2**63), -1, 2**63 - 1, 3]),
    ]:
        tp = tensor_proto(dtype, (4,), np.array(values, NP[dtype]), True)
        raw = tp.SerializeToString()
        t = core.decode_tensor(raw)
        assert np.frombuffer(t.data, NP[dtype]).tolist() == values
        out = tensor_pb2.TensorProto.FromString(core.encode_tensor(dtype, (4,), t.data, True))
        assert list(getattr(out, FIELD[dtype])) == values


def test_int_val_narrowing_keeps_low_bits(core: ModuleType) -> None:
    # TF static_casts int_val to the narrow type.
    tp = tensor_pb2.TensorProto(dtype=UINT8, int_val=[257, -1, 255])
    tp.tensor_shape.dim.add(size=3)
    assert core.decode_tensor(tp.SerializeToString()).data == bytes([1, 255, 255])
    tp = tensor_pb2.TensorProto(dtype=HALF, half_val=[0x3C00, 0x13C00])
    tp.tensor_shape.dim.add(size=2)
    assert core.decode_tensor(tp.SerializeToString()).data == struct.pack("<HH", 0x3C00, 0x3C00)
    # An int32 varint carrying 64 bits keeps its low 32 (protobuf's own rule).
    raw = tag(1, 0) + varint(INT32) + shape_bytes((1,)) + tag(7, 0) + varint(0x1_0000_0002)
    assert core.decode_tensor(raw).data == struct.pack("<i", 2)
    # bool_val: any non-zero varint is true.
    raw = tag(1, 0) + varint(BOOL) + shape_bytes((2,)) + ld(11, varint(2) + varint(0))
    assert core.decode_tensor(raw).data == b"\x01\x00"


def test_only_the_dtypes_field_counts(core: ModuleType) -> None:
    # TF reads float_val for DT_FLOAT and ignores int_val; tensor_content beats typed fields.
    tp = tensor_pb2.TensorProto(dtype=FLOAT, int_val=[1, 2], float_val=[1.5])
    tp.tensor_shape.dim.add(size=2)
    assert core.decode_tensor(tp.SerializeToString()).data == struct.pack("<ff", 1.5, 1.5)
    tp.tensor_content = struct.pack("<ff", 3, 4)
    assert core.decode_tensor(tp.SerializeToString()).data == struct.pack("<ff", 3, 4)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_packed_and_unpacked(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(1)
    arr = make_array(dtype, (4,), rng)
    field = FIELD[dtype]
    number = FIELD_NUMBER[field]
    values = typed_values(dtype, arr)
    if field in FIXED:
        items = [np.array([v], FIXED[field]).tobytes() for v in values]
        wire = 1 if FIXED[field] == "<f8" else 5
    elif field == "string_val":
        items = [varint(len(v)) + v for v in values]
        wire = 2
    else:
        items = [varint(int(v)) for v in values]
        wire = 0
    head = tag(1, 0) + varint(dtype) + shape_bytes((4,))
    unpacked = head + b"".join(tag(number, wire) + item for item in items)
    want = elements(dtype, arr)
    assert core.decode_tensor(unpacked).data == want
    assert tensor_pb2.TensorProto.FromString(unpacked) == tensor_proto(dtype, (4,), arr, True)
    if dtype != STRING:
        packed = head + ld(number, b"".join(items))
        assert core.decode_tensor(packed).data == want
        # One repeated field split over several records, packed and not, is one list.
        mixed = (
            head
            + ld(number, b"".join(items[:1]))
            + tag(number, wire)
            + items[1]
            + ld(number, b"".join(items[2:]))
        )
        assert core.decode_tensor(mixed).data == want


# --- TF's fill rule -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_one_value_fills_the_shape(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(2)
    arr = make_array(dtype, (1,), rng)
    t = core.decode_tensor(tensor_proto(dtype, (2, 3), arr, True).SerializeToString())
    assert t.shape == (2, 3)
    if dtype == STRING:
        assert t.data == [arr[0]] * 6
    else:
        assert t.data == elements(dtype, arr) * 6


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fewer_values_repeat_the_last(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(3)
    arr = make_array(dtype, (3,), rng)
    t = core.decode_tensor(tensor_proto(dtype, (5,), arr, True).SerializeToString())
    full = list(arr) + [arr[-1]] * 2
    if dtype == STRING:
        assert t.data == full
    else:
        assert t.data == np.array(full, NP[dtype]).tobytes()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_no_values_means_zeros(core: ModuleType, dtype: int) -> None:
    tp = tensor_pb2.TensorProto(dtype=dtype)
    tp.tensor_shape.dim.add(size=4)
    t = core.decode_tensor(tp.SerializeToString())
    assert t.data == ([b""] * 4 if dtype == STRING else bytes(4 * NP[dtype].itemsize))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_too_many_values_is_invalid(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(4)
    arr = make_array(dtype, (3,), rng)
    tp = tensor_proto(dtype, (2,), arr, True)
    with pytest.raises(core.CodecError) as err:
        core.decode_tensor(tp.SerializeToString())
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(request_bytes({"x": tp}))
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.message == "tensor parsing error: x: 3 values for 2 elements"


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("delta", [-1, 1])
def test_content_of_wrong_length_is_invalid(core: ModuleType, dtype: int, delta: int) -> None:
    tp = tensor_pb2.TensorProto(dtype=dtype)
    tp.tensor_shape.dim.add(size=2)
    tp.tensor_content = bytes(2 * NP[dtype].itemsize + delta)
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(request_bytes({"in": tp}))
    n = 2 * NP[dtype].itemsize + delta
    assert (err.value.code, err.value.message) == (
        "INVALID_ARGUMENT",
        f"tensor parsing error: in: tensor_content of {n} bytes for 2 elements",
    )


def test_string_tensor_content(core: ModuleType) -> None:
    # TF's own string encoding (EncodeStringList): every length as a varint, then the bytes.
    strings = [b"a", b"", b"x" * 200]
    content = b"".join(varint(len(s)) for s in strings) + b"".join(strings)
    tp = tensor_pb2.TensorProto(dtype=STRING, tensor_content=content)
    tp.tensor_shape.dim.add(size=3)
    assert core.decode_tensor(tp.SerializeToString()).data == strings
    tp.tensor_content = content + b"!"
    with pytest.raises(core.CodecError):
        core.decode_tensor(tp.SerializeToString())
    # Split keeps the encoding.
    parts = core.split_predict_response(response_bytes({"s": tp_with(tp, content)}), [1, 2])
    out = [predict_pb2.PredictResponse.FromString(p).outputs["s"] for p in parts]
    assert out[0].tensor_content == varint(1) + b"a"
    assert out[1].tensor_content == varint(0) + varint(200) + b"x" * 200
    assert core.decode_tensor(out[1].SerializeToString()).data == strings[1:]


def tp_with(tp: tensor_pb2.TensorProto, content: bytes) -> tensor_pb2.TensorProto:
    out = tensor_pb2.TensorProto()
    out.CopyFrom(tp)
    out.tensor_content = content
    return out


# --- requests -----------------------------------------------------------------------------


def test_model_spec_fields_and_key(core: ModuleType) -> None:
    x = tensor_proto(FLOAT, (2, 3), np.zeros((2, 3), "<f4"), False)
    s = tensor_proto(STRING, (2,), [b"a", b"b"], True)
    data = request_bytes(
        {"x": x, "s": s}, name="mnist", version=7, signature="serving", output_filter=("b", "a")
    )
    call = core.decode_predict_request(data)
    assert call.model_name == "mnist"
    assert call.version == 7
    assert call.version_label is None
    assert call.signature_name == "serving"
    assert call.output_filter == ("b", "a")
    assert call.rows == 2
    assert set(call.inputs) == {"x", "s"}
    assert call.key == (
        "mnist",
        7,
        None,
        "serving",
        (("s", STRING, ()), ("x", FLOAT, (3,))),
        ("b", "a"),
    )
    spec = predict_pb2.PredictRequest.FromString(data).model_spec
    assert model_pb2.ModelSpec.FromString(call.model_spec) == spec
    assert call.model_spec == spec.SerializeToString()

    call = core.decode_predict_request(request_bytes({"x": x}, name="m", label="stable"))
    assert (call.version, call.version_label, call.signature_name) == (None, "stable", "")
    # An empty signature name is serving_default's: gRPC callers that leave it out share
    # batches with REST callers, whose signature name is always resolved.
    assert call.key[:4] == ("m", None, "stable", "serving_default")
    named = core.decode_predict_request(
        request_bytes({"x": x}, name="m", label="stable", signature="serving_default"))
    assert named.key == call.key
    # Version 0 is still a version.
    call = core.decode_predict_request(request_bytes({"x": x}, version=0))
    assert call.version == 0
    # Keys tell models, versions, signatures, shapes and dtypes apart.
    keys = {
        core.decode_predict_request(request_bytes({"x": t}, name=n, version=v)).key
        for n in ("a", "b")
        for v in (None, 1)
        for t in (
            x,
            tensor_proto(FLOAT, (2, 4), np.zeros((2, 4)), True),
            tensor_proto(DOUBLE, (2, 3), np.zeros((2, 3)), True),
        )
    }
    assert len(keys) == 12


def test_version_oneof_last_wins(core: ModuleType) -> None:
    x = ld(2, ld(1, b"x") + ld(2, tag(1, 0) + varint(FLOAT) + shape_bytes((1,))))
    spec_v = ld(2, tag(1, 0) + varint(5))
    spec_l = ld(4, b"lab")
    call = core.decode_predict_request(ld(1, ld(1, b"m") + spec_v + spec_l) + x)
    assert (call.version, call.version_label) == (None, "lab")
    call = core.decode_predict_request(ld(1, ld(1, b"m") + spec_l + spec_v) + x)
    assert (call.version, call.version_label) == (5, None)
    # Two model_spec records merge; the last name wins.
    call = core.decode_predict_request(ld(1, ld(1, b"a") + spec_v) + ld(1, ld(1, b"b")) + x)
    assert (call.model_name, call.version) == ("b", 5)
    assert model_pb2.ModelSpec.FromString(call.model_spec).name == "b"


def test_no_model_spec(core: ModuleType) -> None:
    x = tensor_proto(FLOAT, (1,), np.zeros(1), True)
    req = predict_pb2.PredictRequest()
    req.inputs["x"].CopyFrom(x)
    call = core.decode_predict_request(req.SerializeToString())
    assert (call.model_name, call.version, call.version_label, call.model_spec) == (
        "",
        None,
        None,
        b"",
    )
    assert call.rows == 1


def test_duplicate_map_keys_are_refused(core: ModuleType) -> None:
    # protobuf would keep the last entry; which one the client meant is anyone's guess.
    a = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    b = tensor_proto(FLOAT, (2,), np.ones(2), True).SerializeToString()
    bad = tensor_proto(FLOAT, (2,), np.ones(3), True).SerializeToString()
    data = (
        ld(2, ld(1, b"x") + ld(2, a))
        + ld(2, ld(1, b"y") + ld(2, bad))
        + ld(2, ld(1, b"x") + ld(2, b))
    )
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(data)
    # The duplicate is reported before the bad tensor of "y".
    assert (err.value.code, err.value.message) == (
        "INVALID_ARGUMENT",
        "tensor parsing error: x: the inputs map holds this key more than once",
    )
    # Wire errors come first.
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(data + b"\x0a")
    assert err.value.message.startswith("Could not parse PredictRequest")
    # Key/value records repeated inside ONE entry are protobuf's merge, not a duplicate.
    head = tag(1, 0) + varint(FLOAT) + shape_bytes((2,))
    data = ld(2, ld(1, b"z") + ld(1, b"x") + ld(2, head) + ld(2, ld(5, struct.pack("<2f", 1, 2))))
    call = core.decode_predict_request(data)
    assert list(call.inputs) == ["x"] and call.rows == 2
    assert call.inputs["x"].data == struct.pack("<2f", 1, 2)


def test_responses_keep_the_last_of_a_repeated_key(core: ModuleType) -> None:
    a = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    b = tensor_proto(FLOAT, (2,), np.arange(2), True).SerializeToString()
    data = ld(1, ld(1, b"y") + ld(2, a)) + ld(1, ld(1, b"y") + ld(2, b))
    parts = core.split_predict_response(data, [1, 1])
    assert [list(predict_pb2.PredictResponse.FromString(p).outputs["y"].float_val)
            for p in parts] == [[0.0], [1.0]]


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": tensor_proto(FLOAT, (), np.zeros(()), True)},
        {
            "x": tensor_proto(FLOAT, (2,), np.zeros(2), True),
            "y": tensor_proto(FLOAT, (3,), np.zeros(3), True),
        },
        {
            "x": tensor_pb2.TensorProto(
                dtype=RESOURCE,
                tensor_shape={"dim": [{"size": 1}]},
                resource_handle_val=[b"\x0a\x01h"],
            )
        },
        {
            "x": tensor_pb2.TensorProto(
                dtype=VARIANT, tensor_shape={"dim": [{"size": 1}]}, variant_val=[b"\x0a\x01v"]
            )
        },
        {"x": tensor_pb2.TensorProto(dtype=101, tensor_shape={"dim": [{"size": 1}]})},
        {"x": tensor_pb2.TensorProto(dtype=133, tensor_shape={"dim": [{"size": 1}]})},
        {"x": tensor_pb2.TensorProto(dtype=33, tensor_shape={"dim": [{"size": 1}]})},
        {
            "x": tensor_pb2.TensorProto(
                dtype=24, tensor_shape={"dim": [{"size": 1}]}, float8_val=b"\x01"
            )
        },
        {
            "x": tensor_proto(FLOAT, (2,), np.zeros(2), True),
            "r": tensor_pb2.TensorProto(dtype=VARIANT, tensor_shape={"dim": [{"size": 2}]}),
        },
    ],
    ids=[
        "none",
        "scalar",
        "dim0",
        "resource",
        "variant",
        "ref",
        "last_ref",
        "dtype33",
        "float8",
        "mixed",
    ],
)
def test_unbatchable_requests(core: ModuleType, inputs: dict) -> None:
    call = core.decode_predict_request(request_bytes(inputs))
    assert call.rows == -1
    assert set(call.inputs) == set(inputs)


def test_zero_rows_is_batchable(core: ModuleType) -> None:
    call = core.decode_predict_request(
        request_bytes({"x": tensor_proto(FLOAT, (0, 3), np.zeros((0, 3)), False)})
    )
    assert call.rows == 0


MAX_ELEMENTS = 2**31 - 1
FILL_BUDGET = 1 << 28


def test_huge_fill_is_not_expanded(core: ModuleType) -> None:
    # Four bytes on the wire must not make the proxy allocate gigabytes: past the request's
    # fill budget (256 MiB) the tensor stays as sent and the call is forwarded unbatched.
    tp = tensor_pb2.TensorProto(dtype=FLOAT, float_val=[1.0])
    tp.tensor_shape.dim.add(size=FILL_BUDGET // 4 + 1)
    call = core.decode_predict_request(request_bytes({"x": tp}))
    assert call.rows == -1 and call.inputs["x"].data == struct.pack("<f", 1.0)
    tp = tensor_pb2.TensorProto(dtype=STRING)
    tp.tensor_shape.dim.add(size=MAX_ELEMENTS)
    call = core.decode_predict_request(request_bytes({"x": tp}))
    assert call.rows == -1 and call.inputs["x"].data == []
    # A shape past MAX_ELEMENTS is refused outright, whatever the payload.
    tp = tensor_pb2.TensorProto(dtype=FLOAT, float_val=[1.0])
    tp.tensor_shape.dim.add(size=1 << 40)
    tp.tensor_shape.dim.add(size=1 << 40)
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(request_bytes({"x": tp}))
    assert err.value.message == (
        "tensor parsing error: x: shape [1099511627776,1099511627776] is too large (the "
        "product of its non-zero dimensions exceeds 2147483647)"
    )


def test_fill_budget_is_per_request(core: ModuleType) -> None:
    # Each input alone fits the budget; together they do not: the first is expanded, the
    # second stays as sent, and the call is forwarded unbatched.
    half = FILL_BUDGET // 2 // 4  # float elements in half the budget

    def request(b_size: int) -> bytes:  # "a" then "b" on the wire
        a = tensor_proto(FLOAT, (1, half), np.ones(1), True).SerializeToString()
        b = tensor_proto(FLOAT, (1, b_size), np.full(1, 2), True).SerializeToString()
        return ld(2, ld(1, b"a") + ld(2, a)) + ld(2, ld(1, b"b") + ld(2, b))

    call = core.decode_predict_request(request(half + 1))
    assert call.rows == -1
    assert len(call.inputs["a"].data) == 4 * half
    assert call.inputs["b"].data == struct.pack("<f", 2.0)
    # Just within: both expanded, batchable.
    call = core.decode_predict_request(request(half))
    assert call.rows == 1 and len(call.inputs["b"].data) == 4 * half


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((MAX_ELEMENTS,), True),
        ((MAX_ELEMENTS + 1,), False),
        ((0, MAX_ELEMENTS), True),
        ((0, MAX_ELEMENTS + 1), False),  # a 0 does not excuse the other dimensions
        ((2**16, 2**15), False),
        ((2**16, 2**15 - 1), True),
        ((2**62, 2**62, 0), False),  # would overflow int64 before the 0
        ((2**63 - 1,), False),
    ],
)
def test_element_bound(core: ModuleType, shape: tuple[int, ...], ok: bool) -> None:
    tp = tensor_pb2.TensorProto(dtype=STRING, tensor_shape={"dim": [{"size": d} for d in shape]})
    data = request_bytes({"x": tp})
    if ok:
        assert core.decode_predict_request(data).rows == (-1 if math.prod(shape) else 0)
    else:
        with pytest.raises(core.CodecError) as err:
            core.decode_predict_request(data)
        assert err.value.message.startswith("tensor parsing error: x: shape [")
        assert "is too large" in err.value.message


def test_unknown_fields_are_skipped(core: ModuleType) -> None:
    group = tag(99, 3) + tag(1, 0) + varint(1) + tag(7, 3) + ld(2, b"zz") + tag(7, 4) + tag(99, 4)
    junk = (
        tag(900, 0)
        + varint(-1)
        + tag(901, 1)
        + b"\x00" * 8
        + ld(902, b"\x01\x02\x03")
        + tag(903, 5)
        + b"\x00" * 4
        + group
        + tag(2**29 - 1, 0)
        + varint(3)
    )
    vals = struct.pack("<3f", 1, 2, 3)
    tensor = (
        junk
        + tag(1, 0)
        + varint(FLOAT)
        + junk
        + ld(2, junk + ld(2, junk + tag(1, 0) + varint(3) + ld(2, b"rows") + junk) + junk)
        + tag(3, 0)
        + varint(1)  # version_number
        + ld(5, vals)
        + junk
        + ld(8, b"ignored")
        + ld(14, b"r")
        + ld(15, b"v")
        + ld(18, b"f8")
        + tag(1, 2)
        + varint(1)
        + b"\x07"  # dtype with the wrong wire type: an unknown field
    )
    spec = junk + ld(1, b"m") + junk + ld(2, junk + tag(1, 0) + varint(4) + junk) + ld(3, b"sig")
    data = (
        junk
        + ld(1, spec)
        + junk
        + ld(2, junk + ld(1, b"x") + junk + ld(2, tensor) + junk)
        + ld(3, b"out")
        + ld(5, b"o")
        + ld(6, b"c")
        + ld(7, b"r")
        + junk
    )
    call = core.decode_predict_request(data)
    assert (call.model_name, call.version, call.signature_name) == ("m", 4, "sig")
    assert call.output_filter == ("out",)
    assert call.inputs["x"].data == vals and call.inputs["x"].shape == (3,)
    assert call.rows == 3
    # (protobuf's Python runtime, upb, would drop the entry: it files a map entry holding
    # unknown fields under the parent's unknown fields. TFS's C++ runtime keeps it.)
    # The same in a response.
    resp = ld(1, junk + ld(1, b"y") + ld(2, tensor)) + junk + ld(2, spec) + junk
    parts = core.split_predict_response(resp, [2, 1])
    assert [
        list(predict_pb2.PredictResponse.FromString(p).outputs["y"].float_val) for p in parts
    ] == [
        [1, 2],
        [3],
    ]


# --- malformed input ----------------------------------------------------------------------

GOOD_REQUEST = request_bytes(
    {
        "x": tensor_proto(FLOAT, (2, 2), np.arange(4, dtype="<f4").reshape(2, 2), False),
        "i": tensor_proto(INT64, (2,), np.array([-1, 2**40]), True),
        "s": tensor_proto(STRING, (2,), [b"ab", b"c"], True),
    },
    name="model",
    version=3,
    signature="sig",
    output_filter=("y",),
)

BAD_BYTES = [
    b"\x0a",  # tag, no length
    b"\x0a\x05ab",  # length past the end
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # length of 2**64-1
    b"\x08" + b"\x80" * 10 + b"\x01",  # 11-byte varint
    b"\x08\x80",  # truncated varint
    b"\x0e",  # wire type 6
    b"\x0f",  # wire type 7
    b"\x00\x01",  # field number 0
    b"\x09\x00\x00",  # truncated fixed64
    b"\x0d\x00",  # truncated fixed32
    b"\x0b\x08\x01",  # group never closed
    b"\x0c",  # end group with no start
    b"\x0b\x14",  # group closed by another field's end tag
    ld(1, ld(1, b"\xff\xfe")),  # model name not UTF-8
    ld(2, ld(1, b"\xc3")),  # input name not UTF-8
    ld(3, b"\xed\xa0\x80"),  # output_filter: a surrogate is not UTF-8
    ld(1, ld(2, b"\x08")),  # truncated Int64Value
    ld(2, ld(1, b"x") + ld(2, b"\x12\x03\x12\x01")),  # dim running past its shape
    ld(2, ld(1, b"x") + ld(2, ld(5, b"\x00\x00\x00"))),  # packed float_val of 3 bytes
    ld(2, ld(1, b"x") + ld(2, ld(6, b"\x00" * 7))),  # packed double_val of 7 bytes
    ld(2, ld(1, b"x") + ld(2, ld(7, b"\x80"))),  # packed varint cut short
    ld(2, ld(1, b"x") + ld(2, ld(13, b"\xff" * 11))),  # packed varint too long
    # A map key given twice: the last one wins, but the first must be UTF-8 too (found by
    # the atheris harness: the compiled core checked only the last).
    ld(2, ld(1, b"\xed") + ld(1, b"x") + ld(2, b"")),
    # A tag padded to six bytes (a varint32 has five at most; found by the atheris harness).
    ld(2, ld(1, b"x") + ld(2, b"\x88\x80\x80\x80\x80\x00\x01")),
    b"\x8a\x80\x80\x80\x80\x00\x00",
    b"\xfa\xff\xff\xff\x7f\x00",  # a five-byte tag past 32 bits
]


@pytest.mark.parametrize("data", BAD_BYTES, ids=range(len(BAD_BYTES)))
def test_malformed_requests(core: ModuleType, data: bytes) -> None:
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(data)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.message.startswith("Could not parse PredictRequest")
    with pytest.raises(Exception):  # noqa: B017 - protobuf agrees these are broken
        predict_pb2.PredictRequest.FromString(data)


def test_field_number_zero_inside_a_group(core: ModuleType) -> None:
    # C++ protobuf (TFS) refuses field number 0 anywhere; upb (the Python runtime, hence the
    # pure-Python core) lets it pass inside an unknown group.
    data = tag(99, 3) + tag(0, 0)[:1] + b"\x01" + tag(99, 4)
    if core.__name__.endswith("_core"):
        with pytest.raises(core.CodecError):
            core.decode_predict_request(data)
    else:
        assert core.decode_predict_request(data).rows == -1


def test_truncated_requests_never_crash(core: ModuleType) -> None:
    for cut in range(len(GOOD_REQUEST)):
        data = GOOD_REQUEST[:cut]
        try:
            predict_pb2.PredictRequest.FromString(data)
        except Exception:
            with pytest.raises(core.CodecError) as err:
                core.decode_predict_request(data)
            assert err.value.code == "INVALID_ARGUMENT"
        else:  # a cut on a field boundary is a valid (smaller) message
            try:
                core.decode_predict_request(data)
            except core.CodecError as exc:
                assert exc.message.startswith("tensor parsing error")


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(data=st.binary(max_size=64), pos=st.integers(0, len(GOOD_REQUEST)))
def test_random_bytes_never_crash(core: ModuleType, data: bytes, pos: int) -> None:
    for blob in (data, GOOD_REQUEST[:pos] + data + GOOD_REQUEST[pos:]):
        for fn in (
            core.decode_predict_request,
            core.decode_tensor,
            lambda b: core.split_predict_response(b, [1, 1]),
            lambda b: core.concat_predict_responses([b, b]),
        ):
            try:
                fn(blob)
            except core.CodecError as exc:
                assert exc.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "INTERNAL")


def test_malformed_responses(core: ModuleType) -> None:
    for data in BAD_BYTES[:13]:
        with pytest.raises(core.CodecError) as err:
            core.split_predict_response(data, [1])
        assert err.value.code == "INTERNAL"
    bad = tensor_pb2.TensorProto(dtype=FLOAT, tensor_content=b"\x00" * 7)
    bad.tensor_shape.dim.add(size=2)
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(response_bytes({"y": bad}), [1, 1])
    assert err.value.code == "INTERNAL"


def test_codec_error(core: ModuleType) -> None:
    err = core.CodecError("INVALID_ARGUMENT", "boom")
    assert isinstance(err, ValueError)
    assert (err.code, err.message, str(err)) == ("INVALID_ARGUMENT", "boom", "boom")


# --- merge and split ----------------------------------------------------------------------


def make_calls(
    core: ModuleType,
    dtype: int,
    inner: tuple[int, ...],
    rows: list[int],
    rng: np.random.Generator,
    typed: bool,
):
    """(calls, per-call arrays) of two inputs: `x` of dtype and a float `aux`."""
    calls, arrays = [], []
    for r in rows:
        x = make_array(dtype, (r, *inner), rng)
        aux = make_array(FLOAT, (r, 2), rng)
        data = request_bytes(
            {
                "x": tensor_proto(dtype, (r, *inner), x, typed),
                "aux": tensor_proto(FLOAT, (r, 2), aux, not typed),
            },
            name="m",
            version=2,
            signature="s",
            output_filter=("y", "aux"),
        )
        call = core.decode_predict_request(data)
        assert call.rows == r
        assert call.inputs["x"].data == elements(dtype, x)
        calls.append(call)
        arrays.append((x, aux))
    return calls, arrays


def echo_response(merged: bytes, typed_y: bool, typed_aux: bool) -> bytes:
    """What a model that returns its inputs would answer, in the chosen encodings."""
    req = predict_pb2.PredictRequest.FromString(merged)
    outs = {}
    for name, typed in (("y", typed_y), ("aux", typed_aux)):
        src = req.inputs["x" if name == "y" else "aux"]
        out = tensor_pb2.TensorProto(dtype=src.dtype)
        out.tensor_shape.CopyFrom(src.tensor_shape)
        out.tensor_shape.dim[0].name = "batch"
        if src.dtype == STRING:
            out.string_val.extend(src.string_val)
        elif typed:
            arr = np.frombuffer(src.tensor_content, NP[src.dtype])
            getattr(out, FIELD[src.dtype]).extend(typed_values(src.dtype, arr))
        else:
            out.tensor_content = src.tensor_content
        outs[name] = out
    return response_bytes(outs, spec_name="m")


def check_merge_split(core, dtype, inner, rows, seed, typed_req, typed_y, typed_aux):
    rng = np.random.default_rng(seed)
    calls, _ = make_calls(core, dtype, inner, rows, rng, typed_req)
    # Every call contributes a sub-range of its rows (the batcher may cut calls).
    pieces = []
    for call in calls:
        start = int(rng.integers(0, call.rows + 1))
        stop = int(rng.integers(start, call.rows + 1))
        pieces.append((call, start, stop))
    counts = [stop - start for _, start, stop in pieces]
    merged = core.encode_predict_request(pieces)
    req = predict_pb2.PredictRequest.FromString(merged)
    assert model_pb2.ModelSpec.FromString(calls[0].model_spec) == req.model_spec
    assert list(req.output_filter) == ["y", "aux"]
    assert list(req.inputs) == ["x", "aux"] or set(req.inputs) == {"x", "aux"}
    x = req.inputs["x"]
    assert (x.dtype, dims(x)) == (dtype, (sum(counts), *inner))
    if dtype == STRING:
        assert not x.tensor_content
    else:
        assert not any(len(getattr(x, f)) for f in FIELD_NUMBER)
    want = [rows_of(dtype, c.inputs["x"].data, inner, a, b) for c, a, b in pieces]
    assert pb_elements(x) == ([s for w in want for s in w] if dtype == STRING else b"".join(want))
    remerged = core.decode_predict_request(merged)
    assert remerged.key == calls[0].key and remerged.rows == sum(counts)

    resp = echo_response(merged, typed_y, typed_aux)
    parts = core.split_predict_response(resp, counts)
    assert len(parts) == len(counts)
    for part, (call, a, b), n in zip(parts, pieces, counts, strict=True):
        p = predict_pb2.PredictResponse.FromString(part)
        assert p.model_spec.name == "m"
        assert list(p.outputs) == ["y", "aux"] or set(p.outputs) == {"y", "aux"}
        y = p.outputs["y"]
        assert dims(y) == (n, *inner) and y.tensor_shape.dim[0].name == "batch"
        assert y.dtype == dtype
        if dtype != STRING and (typed_y or n * math.prod(inner) == 0):
            assert not y.tensor_content
        got = core.decode_tensor(y.SerializeToString()).data
        assert got == rows_of(dtype, call.inputs["x"].data, inner, a, b)
        aux = p.outputs["aux"]
        assert core.decode_tensor(aux.SerializeToString()).data == rows_of(
            FLOAT, call.inputs["aux"].data, (2,), a, b
        )
    # Joining the parts gives back the replica's answer.
    assert canon(core.concat_predict_responses(parts)) == canon(resp)
    return parts


@pytest.mark.parametrize("typed_resp", [True, False], ids=["typed", "content"])
@pytest.mark.parametrize("typed_req", [True, False], ids=["typed", "content"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_merge_then_split(core: ModuleType, dtype: int, typed_req: bool, typed_resp: bool) -> None:
    check_merge_split(
        core, dtype, (2, 3), [1, 3, 2, 1], dtype, typed_req, typed_resp, not typed_resp
    )


@settings(
    max_examples=300, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow]
)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    inner=st.lists(st.integers(0, 3), max_size=3).map(tuple),
    rows=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    typed=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_merge_then_split_property(core, dtype, inner, rows, seed, typed) -> None:
    check_merge_split(core, dtype, inner, rows, seed, *typed)


@settings(
    max_examples=200, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow]
)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    inner=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    rows=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    typed=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_cores_agree(both_cores, dtype, inner, rows, seed, typed) -> None:
    cy, py = both_cores
    parts_cy = check_merge_split(cy, dtype, inner, rows, seed, *typed)
    parts_py = check_merge_split(py, dtype, inner, rows, seed, *typed)
    assert [canon(p) for p in parts_cy] == [canon(p) for p in parts_py]
    # Same request bytes -> same decoded calls.
    rng = np.random.default_rng(seed)
    shape = (sum(rows), *inner)
    arr = make_array(dtype, shape, rng)
    data = request_bytes({"x": tensor_proto(dtype, shape, arr, typed[0])}, label="l")
    a, b = cy.decode_predict_request(data), py.decode_predict_request(data)
    for field in (
        "model_name",
        "version",
        "version_label",
        "signature_name",
        "output_filter",
        "model_spec",
        "rows",
        "key",
    ):
        assert getattr(a, field) == getattr(b, field)
    assert {k: (t.dtype, t.shape, t.data) for k, t in a.inputs.items()} == {
        k: (t.dtype, t.shape, t.data) for k, t in b.inputs.items()
    }
    for typed_enc in (True, False):
        assert canon(
            cy.encode_tensor(dtype, shape, elements(dtype, arr), typed_enc), tensor_pb2.TensorProto
        ) == canon(
            py.encode_tensor(dtype, shape, elements(dtype, arr), typed_enc), tensor_pb2.TensorProto
        )


# --- split corner cases -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_split_one_value_form(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(5)
    one = make_array(dtype, (1,), rng)
    tp = tensor_proto(dtype, (4, 2), one, True)
    parts = core.split_predict_response(response_bytes({"y": tp}), [1, 0, 3])
    outs = [predict_pb2.PredictResponse.FromString(p).outputs["y"] for p in parts]
    field = FIELD[dtype]
    per = 2 if dtype in (COMPLEX64, COMPLEX128) else 1
    assert [len(getattr(o, field)) for o in outs] == [per, 0, per]
    assert [dims(o) for o in outs] == [(1, 2), (0, 2), (3, 2)]
    for o, n in zip(outs, (2, 0, 6), strict=True):
        data = core.decode_tensor(o.SerializeToString()).data
        assert data == (elements(dtype, one) * n if dtype != STRING else [one[0]] * n)
    assert canon(core.concat_predict_responses(parts)) != b""
    joined = predict_pb2.PredictResponse.FromString(core.concat_predict_responses(parts))
    assert core.decode_tensor(joined.outputs["y"].SerializeToString()).data == (
        elements(dtype, one) * 8 if dtype != STRING else [one[0]] * 8
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_split_partial_fill_and_zeros(core: ModuleType, dtype: int) -> None:
    rng = np.random.default_rng(6)
    some = make_array(dtype, (3,), rng)
    full = list(some) + [some[-1]] * 3
    tp = tensor_proto(dtype, (3, 2), some, True)
    parts = core.split_predict_response(response_bytes({"y": tp}), [2, 1])
    got = [
        core.decode_tensor(
            predict_pb2.PredictResponse.FromString(p).outputs["y"].SerializeToString()
        ).data
        for p in parts
    ]
    if dtype == STRING:
        assert got == [full[:4], full[4:]]
    else:
        flat = np.array(full, NP[dtype]).tobytes()
        size = NP[dtype].itemsize
        assert got == [flat[: 4 * size], flat[4 * size :]]
        # Packed varints are cut at element boundaries, never re-encoded.
    empty = tensor_pb2.TensorProto(dtype=dtype)
    empty.tensor_shape.dim.add(size=3)
    parts = core.split_predict_response(response_bytes({"y": empty}), [2, 1])
    for p, n in zip(parts, (2, 1), strict=True):
        out = predict_pb2.PredictResponse.FromString(p).outputs["y"]
        assert dims(out) == (n,)
        assert (
            out.SerializeToString()
            == tensor_pb2.TensorProto(
                dtype=dtype, tensor_shape={"dim": [{"size": n}]}
            ).SerializeToString()
        )


def test_split_keeps_raw_varints(core: ModuleType) -> None:
    odd = b"\x85\x80\x00"  # 5 in three bytes
    vals = varint(-3) + odd + varint(7) + varint(2**31 - 1)
    tensor = tag(1, 0) + varint(INT32) + shape_bytes((4,)) + ld(7, vals)
    parts = core.split_predict_response(ld(1, ld(1, b"y") + ld(2, tensor)), [2, 2])
    if core.__name__.endswith("_core"):
        # The compiled core copies varints byte for byte, a padded one included.
        assert ld(7, varint(-3) + odd) in parts[0]
    assert ld(7, varint(7) + varint(2**31 - 1)) in parts[1]
    assert [
        list(predict_pb2.PredictResponse.FromString(p).outputs["y"].int_val) for p in parts
    ] == [
        [-3, 5],
        [7, 2**31 - 1],
    ]


def test_split_without_model_spec_and_order(core: ModuleType) -> None:
    names = ["z", "a", "m", "b"]
    outs = {
        n: tensor_proto(FLOAT, (2,), np.array([i, i + 1], "<f4"), True) for i, n in enumerate(names)
    }
    resp = b"".join(
        predict_pb2.PredictResponse(outputs={k: v}).SerializeToString() for k, v in outs.items()
    )
    parts = core.split_predict_response(resp, [1, 1])
    for p, i in zip(parts, (0, 1), strict=True):
        assert not predict_pb2.PredictResponse.FromString(p).HasField("model_spec")
        # The map entries come out in the replica's order.
        keys = [p.find(ld(1, n.encode())[:3]) for n in names]
        assert keys == sorted(keys) and -1 not in keys
        assert predict_pb2.PredictResponse.FromString(p).outputs["a"].float_val == [1 + i]


def test_split_errors(core: ModuleType) -> None:
    y = tensor_proto(FLOAT, (3, 2), np.zeros((3, 2)), True)
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(response_bytes({"y": y}), [1, 1])
    assert err.value.code == "FAILED_PRECONDITION"
    scalar = tensor_proto(FLOAT, (), np.zeros(()), True)
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(response_bytes({"y": y, "s": scalar}), [2, 1])
    assert err.value.code == "FAILED_PRECONDITION"
    unknown = tensor_pb2.TensorProto(dtype=FLOAT, tensor_shape={"unknown_rank": True})
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(response_bytes({"u": unknown}), [1])
    assert err.value.code == "FAILED_PRECONDITION"
    too_many = tensor_proto(FLOAT, (2,), np.zeros(3), True)
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(response_bytes({"y": too_many}), [1, 1])
    assert err.value.code == "INTERNAL"
    # No outputs at all: every part is just the model_spec.
    parts = core.split_predict_response(response_bytes({}), [1, 2])
    assert [predict_pb2.PredictResponse.FromString(p).model_spec.name for p in parts] == ["m", "m"]


def test_concat_mixed_encodings(core: ModuleType) -> None:
    a = tensor_proto(INT32, (1, 2), np.array([[1, -2]], "<i4"), True)
    b = tensor_proto(INT32, (2, 2), np.array([[3, 4], [5, -6]], "<i4"), False)
    c = tensor_proto(INT32, (1, 2), np.array([7], "<i4"), True)  # one-value form
    joined = core.concat_predict_responses(
        [response_bytes({"y": a}), response_bytes({"y": b}), response_bytes({"y": c})]
    )
    out = predict_pb2.PredictResponse.FromString(joined)
    assert list(out.outputs["y"].int_val) == [1, -2, 3, 4, 5, -6, 7, 7]
    assert dims(out.outputs["y"]) == (4, 2) and out.model_spec.name == "m"
    joined = core.concat_predict_responses([response_bytes({"y": b}), response_bytes({"y": a})])
    out = predict_pb2.PredictResponse.FromString(joined).outputs["y"]
    assert out.tensor_content == np.array([3, 4, 5, -6, 1, -2], "<i4").tobytes()
    assert core.concat_predict_responses([response_bytes({"y": a})]) == response_bytes({"y": a})
    with pytest.raises(core.CodecError):
        core.concat_predict_responses(
            [
                response_bytes({"y": a}),
                response_bytes({"y": tensor_proto(INT32, (1, 3), np.zeros(3, "<i4"), True)}),
            ]
        )


def test_encode_predict_response(core: ModuleType) -> None:
    y = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    s = tensor_proto(STRING, (1,), [b"q"], True).SerializeToString()
    spec = model_pb2.ModelSpec(name="m", signature_name="sig").SerializeToString()
    data = core.encode_predict_response({"y": y, "s": s}, spec)
    resp = predict_pb2.PredictResponse.FromString(data)
    assert resp.outputs["y"].float_val == [1.0] and resp.outputs["s"].string_val == [b"q"]
    assert resp.model_spec.signature_name == "sig"
    assert data.index(b"\x0a\x01y") < data.index(b"\x0a\x01s")


def test_encode_predict_request_checks_pieces(core: ModuleType) -> None:
    call = core.decode_predict_request(
        request_bytes({"x": tensor_proto(FLOAT, (2,), np.zeros(2), True)})
    )
    other = core.decode_predict_request(
        request_bytes({"x": tensor_proto(FLOAT, (2, 2), np.zeros(4), True)})
    )
    for pieces in ([], [(call, 0, 3)], [(call, 2, 1)], [(call, 0, 1), (other, 0, 1)]):
        with pytest.raises(core.CodecError):
            core.encode_predict_request(pieces)


def test_encode_tensor_checks_sizes(core: ModuleType) -> None:
    with pytest.raises(core.CodecError):
        core.encode_tensor(FLOAT, (2,), b"\x00" * 4, True)
    with pytest.raises(core.CodecError):
        core.encode_tensor(STRING, (2,), [b""], True)
    with pytest.raises(core.CodecError):
        core.encode_tensor(VARIANT, (1,), b"", True)


def test_tensor_and_call_objects(core: ModuleType) -> None:
    t = core.Tensor(FLOAT, (1,), b"\x00\x00\x80\x3f")
    assert (t.dtype, t.shape, t.data) == (FLOAT, (1,), b"\x00\x00\x80\x3f")
    call = core.PredictCall(model_name="m", inputs={"x": core.Tensor(FLOAT, (2,), bytes(8))})
    assert call.rows == 2
    assert call.key == ("m", None, None, "serving_default", (("x", FLOAT, ()),), ())
    merged = predict_pb2.PredictRequest.FromString(core.encode_predict_request([(call, 0, 2)]))
    assert merged.inputs["x"].tensor_content == bytes(8)


# --- TensorFlow itself (optional) ---------------------------------------------------------

# TensorFlow registers its own tensorflow.TensorProto in protobuf's descriptor pool, which
# clashes with ours, so it runs in a child process: it reads core-made TensorProtos and
# writes make_tensor_proto's output with make_ndarray's reading of both.
TF_SCRIPT = """
import pickle, sys
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
cases, ours = pickle.load(sys.stdin.buffer)
out = []
for arr, shape in cases:
    proto = tf.make_tensor_proto(arr, shape=shape)
    out.append((proto.SerializeToString(), tf.make_ndarray(proto)))
back = [tf.make_ndarray(tensor_pb2.TensorProto.FromString(b)) for b in ours]
pickle.dump((out, back), sys.stdout.buffer)
"""

TF_CASES = [
    (np.arange(6, dtype=np.float32).reshape(2, 3), None),
    (np.array([1.5], np.float32), [2, 3]),  # the one-value form
    (np.array([-1, -7], np.int8), [4]),  # fewer values: repeat the last
    (np.array([True, False]), None),
    (np.array([1 + 2j, 3 - 4j], np.complex64), None),
    (np.array([1 + 2j], np.complex128), [3]),
    (np.array([1.5, -2], np.float16), None),
    (np.array([-(2**63), 5], np.int64), None),
    (np.array([2**64 - 1], np.uint64), [2]),
    (np.array([-5, 6], np.int16), None),
    (np.array([7, 255], np.uint8), None),
    (np.array([b"ab", b""], object), None),
    (np.array(3.25, np.float64), None),
]

TF_DTYPES = {
    np.dtype(np.float32): FLOAT,
    np.dtype(np.float64): DOUBLE,
    np.dtype(np.int8): INT8,
    np.dtype(np.int16): INT16,
    np.dtype(np.int64): INT64,
    np.dtype(np.uint8): UINT8,
    np.dtype(np.uint64): UINT64,
    np.dtype(np.complex64): COMPLEX64,
    np.dtype(np.complex128): COMPLEX128,
    np.dtype(np.float16): HALF,
    np.dtype(bool): BOOL,
    np.dtype(object): STRING,
}


@pytest.mark.interop
def test_against_tensorflow(both_cores) -> None:
    import importlib.util
    import pickle
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is None:  # importing it here would clash
        pytest.skip("tensorflow not installed")
    ours = []
    for core in both_cores:
        for arr, _ in TF_CASES:
            dtype = TF_DTYPES[arr.dtype]
            data = list(arr.ravel()) if dtype == STRING else arr.tobytes()
            for typed in (True, False):
                ours.append(core.encode_tensor(dtype, arr.shape, data, typed))
    proc = subprocess.run(
        [sys.executable, "-c", TF_SCRIPT],
        input=pickle.dumps(([(a, s) for a, s in TF_CASES], ours)),
        capture_output=True,
        check=True,
        timeout=300,
    )
    made, back = pickle.loads(proc.stdout)
    for core in both_cores:
        for (raw, want), (arr, _) in zip(made, TF_CASES, strict=True):
            t = core.decode_tensor(raw)
            assert t.shape == want.shape
            if arr.dtype == object:
                assert t.data == list(want.ravel())
            else:
                assert t.data == want.tobytes()
    expected = [arr for _ in both_cores for arr, _ in TF_CASES for _typed in (True, False)]
    for got, arr in zip(back, expected, strict=True):
        assert got.shape == arr.shape
        if arr.dtype == object:
            assert list(got.ravel()) == list(arr.ravel())
        else:
            assert got.tobytes() == arr.tobytes()


def test_both_cores_read_the_one_dtype_table(core: ModuleType) -> None:
    from batchproxy.codec import dtypes

    for dt in dtypes.DATA_TYPES:
        assert core.itemsize(dt.value) == dt.itemsize, dt.name
    for value in (24, 33, 101, -1, 1000):  # valid or not, never batched
        assert core.itemsize(value) == -1


# --- decode_predict_response: the REST answer path ----------------------------------------


def old_answer_path(core: ModuleType, data: bytes) -> tuple[dict, int | None]:
    """What the REST frontend did before the codec read answers: protobuf, then each output
    re-serialized through decode_tensor."""
    resp = predict_pb2.PredictResponse.FromString(data)
    outputs = {
        name: core.decode_tensor(resp.outputs[name].SerializeToString())
        for name in sorted(resp.outputs)
    }
    spec = resp.model_spec
    return outputs, spec.version.value if spec.HasField("version") else None


def as_tuples(outputs: dict) -> dict:
    return {k: (t.dtype, t.shape, t.data) for k, t in outputs.items()}


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "content"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_decode_predict_response_every_dtype(core: ModuleType, dtype: int, typed: bool) -> None:
    rng = np.random.default_rng(dtype)
    shapes = {"b": (2, 3), "a_bytes": (2,), "s": ()}
    arrays = {name: make_array(dtype, shape, rng) for name, shape in shapes.items()}
    resp = predict_pb2.PredictResponse()
    for name, arr in arrays.items():
        resp.outputs[name].CopyFrom(tensor_proto(dtype, shapes[name], arr, typed))
    resp.model_spec.name = "m"
    resp.model_spec.version.value = 7
    data = resp.SerializeToString()
    outputs, version = core.decode_predict_response(data)
    assert list(outputs) == ["a_bytes", "b", "s"]  # sorted by name
    assert version == 7
    assert as_tuples(outputs) == {
        name: (dtype, shapes[name], elements(dtype, arr)) for name, arr in arrays.items()
    }
    old_outputs, old_version = old_answer_path(core, data)
    assert (as_tuples(outputs), version) == (as_tuples(old_outputs), old_version)


def test_decode_predict_response_version_and_spec(core: ModuleType) -> None:
    y = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    entry = ld(1, ld(1, b"y") + ld(2, y))
    assert core.decode_predict_response(entry)[1] is None  # no model_spec
    spec = model_pb2.ModelSpec(name="m", version_label="canary").SerializeToString()
    assert core.decode_predict_response(entry + ld(2, spec))[1] is None  # a label, no version
    # version then label: the oneof's last member wins; records of the spec merge.
    v3 = model_pb2.ModelSpec(name="m", version={"value": 3}).SerializeToString()
    assert core.decode_predict_response(entry + ld(2, spec) + ld(2, v3))[1] == 3
    assert core.decode_predict_response(entry + ld(2, v3) + ld(2, spec))[1] is None
    assert core.decode_predict_response(b"") == ({}, None)


def test_decode_predict_response_repeated_key_and_fill(core: ModuleType) -> None:
    a = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    b = tensor_proto(FLOAT, (3,), np.arange(1), True).SerializeToString()  # one value: filled
    data = ld(1, ld(1, b"y") + ld(2, a)) + ld(1, ld(1, b"y") + ld(2, b))
    outputs, _ = core.decode_predict_response(data)
    assert as_tuples(outputs) == {"y": (FLOAT, (3,), np.zeros(3, "<f4").tobytes())}
    assert as_tuples(outputs) == as_tuples(old_answer_path(core, data)[0])
    # A dtype the core does not batch keeps its shape and carries no data, as decode_tensor.
    res = tensor_pb2.TensorProto(dtype=RESOURCE, tensor_shape={"dim": [{"size": 1}]},
                                 resource_handle_val=[b"\x0a\x01h"])
    data = ld(1, ld(1, b"r") + ld(2, res.SerializeToString()))
    assert as_tuples(core.decode_predict_response(data)[0]) == {"r": (RESOURCE, (1,), b"")}


def _bad_tensors() -> list[tensor_pb2.TensorProto]:
    short = tensor_pb2.TensorProto(dtype=FLOAT, tensor_content=b"\x00" * 7)
    short.tensor_shape.dim.add(size=2)
    many = tensor_pb2.TensorProto(dtype=INT32, int_val=[1, 2, 3])
    many.tensor_shape.dim.add(size=2)
    negative = tensor_pb2.TensorProto(dtype=FLOAT)
    negative.tensor_shape.dim.add(size=-1)
    odd = tensor_pb2.TensorProto(dtype=COMPLEX64, scomplex_val=[1.0])
    odd.tensor_shape.dim.add(size=1)
    bad_strings = tensor_pb2.TensorProto(dtype=STRING, tensor_content=b"\x05ab")
    bad_strings.tensor_shape.dim.add(size=1)
    huge = tensor_pb2.TensorProto(dtype=DOUBLE, double_val=[1.0, 2.0])  # 2 values: expand
    for size in (2**15, 2**15):
        huge.tensor_shape.dim.add(size=size)
    return [short, many, negative, odd, bad_strings, tensor_pb2.TensorProto(), huge]


@pytest.mark.parametrize("index", range(len(_bad_tensors())))
def test_decode_predict_response_malformed_outputs_are_internal(core: ModuleType,
                                                                index: int) -> None:
    bad = _bad_tensors()[index]
    data = response_bytes({"ok": tensor_proto(FLOAT, (1,), np.ones(1), True), "y": bad})
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_response(data)
    assert err.value.code == "INTERNAL"
    assert err.value.message.startswith("output y: ")


def test_decode_predict_response_malformed_bytes_are_internal(core: ModuleType) -> None:
    for data in BAD_BYTES[:13]:
        with pytest.raises(core.CodecError) as err:
            core.decode_predict_response(data)
        assert err.value.code == "INTERNAL"
        assert err.value.message.startswith("Could not parse PredictResponse: ")
    # A ModelSpec that does not parse, and an output name that is no UTF-8.
    y = tensor_proto(FLOAT, (1,), np.ones(1), True).SerializeToString()
    for data in (ld(1, ld(1, b"y") + ld(2, y)) + ld(2, b"\x0a\x05ab"),
                 ld(1, ld(1, b"\xff") + ld(2, y))):
        with pytest.raises(core.CodecError) as err:
            core.decode_predict_response(data)
        assert err.value.code == "INTERNAL"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64), pos=st.integers(0, 200))
def test_decode_predict_response_random_bytes_never_crash(core: ModuleType, data: bytes,
                                                          pos: int) -> None:
    y = tensor_proto(INT64, (2, 2), np.arange(4), True).SerializeToString()
    good = response_bytes({"y": tensor_pb2.TensorProto.FromString(y)})
    for blob in (data, good[: pos % (len(good) + 1)], good[:pos] + data + good[pos:]):
        try:
            core.decode_predict_response(blob)
        except core.CodecError as exc:
            assert exc.code == "INTERNAL"


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    outputs=st.dictionaries(
        _names,
        st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 3), max_size=3),
                  st.booleans()),
        max_size=3,
    ),
    version=st.none() | st.integers(-(2**63), 2**63 - 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_predict_response_round_trips_protobuf(both_cores, outputs, version,
                                                      seed) -> None:
    rng = np.random.default_rng(seed)
    resp = predict_pb2.PredictResponse()
    want = {}
    for name, (dtype, shape, typed) in outputs.items():
        arr = make_array(dtype, tuple(shape), rng)
        resp.outputs[name].CopyFrom(tensor_proto(dtype, tuple(shape), arr, typed))
        want[name] = (dtype, tuple(shape), elements(dtype, arr))
    resp.model_spec.name = "m"
    if version is not None:
        resp.model_spec.version.value = version
    data = resp.SerializeToString()
    for core in both_cores:
        got, got_version = core.decode_predict_response(data)
        assert list(got) == sorted(want)
        assert (as_tuples(got), got_version) == (want, version)
