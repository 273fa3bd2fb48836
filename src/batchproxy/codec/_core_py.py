"""Pure-Python twin of the compiled wire codec `_core.pyx` (see `_core.pyi` for the contract).

It leans on the generated protobuf classes for parsing and on numpy for element conversions,
so it doubles as the reference the compiled core is tested against. Two things protobuf's
Python API cannot give us are done by hand with a small wire scanner: the order of map
entries as they appear on the wire (protobuf maps iterate in hash order, but the proxy keeps
the replica's output order) and the exact bytes of an embedded ModelSpec.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable

import numpy as np
from google.protobuf.message import DecodeError

from batchproxy.codec import dtypes
from batchproxy.protos import predict_pb2, tensor_pb2

# --- DataType tables, built from the one table in dtypes.py -------------------------------

DT_STRING = dtypes.DT_STRING
DT_COMPLEX64 = dtypes.DT_COMPLEX64
DT_COMPLEX128 = dtypes.DT_COMPLEX128

_BATCHABLE = [dt for dt in dtypes.DATA_TYPES if dt.batchable]
# Bytes per element in tensor_content form (0: DT_STRING). Absent: not batchable.
_ITEMSIZE: dict[int, int] = {dt.value: dt.itemsize for dt in _BATCHABLE}
# The typed TensorProto field TF reads for each dtype.
_FIELD: dict[int, str] = {dt.value: dt.field for dt in _BATCHABLE}
# Fields whose values are fixed-width: written as one packed record of raw bytes.
_FIELD_NUMBER: dict[str, int] = {
    f.name: f.number for f in dtypes.VALUE_FIELDS
    if f.wire in (dtypes.WIRE_FIXED32, dtypes.WIRE_FIXED64)
}
# numpy dtype of one normalized element.
_ELEMENT: dict[int, np.dtype] = {dt.value: np.dtype(dt.element) for dt in _BATCHABLE
                                 if dt.element}
# numpy dtype of the values protobuf hands back for each typed field.
_FIELD_VALUES: dict[str, np.dtype] = {f.name: np.dtype(f.values) for f in dtypes.VALUE_FIELDS
                                      if f.values}

# TF's fill rule (one value, or fewer values than the shape holds) lets a few bytes on the
# wire claim a large tensor. Expanding costs the normalized size (strings: 8 bytes an element,
# one reference each) and one request may spend at most this much on it, over all its
# inputs; a tensor that would go past the budget is not expanded and the call is forwarded
# unbatched (the replica expands it, as TFS would). The proxy's default message limit is
# 256 MiB too, so a batch never holds more than a client could have sent in full. Same
# budget in the compiled core.
MAX_FILL_BYTES = 1 << 28
# TensorShape::MaxDimensions().
MAX_RANK = 254
# The most elements a request tensor may claim: its shape's non-zero dimensions multiplied
# (a dimension of 0 does not excuse the others: per-row sizes are computed from them). No
# tensor this large fits in a gRPC message in full (INT32_MAX bytes), and the bound keeps
# every size computed from a shape far from int64 overflow. TF's own limit is 2**63 - 1.
MAX_ELEMENTS = (1 << 31) - 1
# Shapes quoted in messages show at most this many dimensions.
_SHAPE_TEXT_DIMS = 8


_valid_dtype = dtypes.valid_dtype


def _shape_text(dims: tuple[int, ...]) -> str:
    shown = [str(d) for d in dims[:_SHAPE_TEXT_DIMS]]
    if len(dims) > _SHAPE_TEXT_DIMS:
        shown.append("...")
    return "[" + ",".join(shown) + "]"


class CodecError(ValueError):
    """Input the codec refuses. `code` is a grpc.StatusCode name such as "INVALID_ARGUMENT"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"CodecError({self.code!r}, {self.message!r})"

    def __reduce__(self) -> tuple:
        return (type(self), (self.code, self.message))


class Tensor:
    """A tensor in normalized form: every element, whatever encoding the client used."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, dtype: int, shape: tuple[int, ...], data: bytes | list[bytes]) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)
        self.data = data

    @property
    def content(self) -> bytes:
        """The element bytes of a fixed-width tensor (not DT_STRING)."""
        data = self.data
        assert isinstance(data, bytes)
        return data

    @property
    def strings(self) -> list[bytes]:
        """The elements of a DT_STRING tensor."""
        data = self.data
        assert isinstance(data, list)
        return data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype, self.shape, self.data) == (other.dtype, other.shape, other.data)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Tensor(dtype={self.dtype}, shape={self.shape}, data=<{len(self.data)}>)"


class PredictCall:
    """One decoded PredictRequest (see _core.pyi for every field)."""

    __slots__ = (
        "inputs",
        "key",
        "model_name",
        "model_spec",
        "output_filter",
        "rows",
        "signature_name",
        "version",
        "version_label",
    )

    def __init__(
        self,
        model_name: str = "",
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "",
        output_filter: tuple[str, ...] = (),
        model_spec: bytes = b"",
        inputs: dict[str, Tensor] | None = None,
        rows: int | None = None,
        key: tuple | None = None,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.version_label = version_label
        self.signature_name = signature_name
        self.output_filter = tuple(output_filter)
        self.model_spec = model_spec
        self.inputs = {} if inputs is None else inputs
        self.rows = _batch_rows(self.inputs) if rows is None else rows
        self.key = self._make_key() if key is None else key

    def _make_key(self) -> tuple:
        sig = tuple((name, t.dtype, t.shape[1:]) for name, t in sorted(self.inputs.items()))
        return (
            self.model_name,
            self.version,
            self.version_label,
            # TFS reads an empty signature name as "serving_default": one batch key for both.
            self.signature_name or "serving_default",
            sig,
            self.output_filter,
        )

    def __repr__(self) -> str:
        return (
            f"PredictCall(model_name={self.model_name!r}, version={self.version!r}, "
            f"version_label={self.version_label!r}, signature_name={self.signature_name!r}, "
            f"rows={self.rows}, inputs={self.inputs!r})"
        )


def itemsize(dtype: int) -> int:
    """Bytes per element in tensor_content form; 0 for DT_STRING; -1 for unsupported dtypes."""
    return _ITEMSIZE.get(dtype, -1)


# --- a minimal wire scanner (only run on bytes protobuf already accepted) ---------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int, field: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 3:  # group: skip fields up to the matching end tag
        while True:
            tag, pos = _varint(buf, pos)
            if tag & 7 == 4:
                return pos
            pos = _skip(buf, pos, tag & 7, tag >> 3)
    raise CodecError("INTERNAL", f"unexpected wire type {wire} in field {field}")


def _len_fields(buf: bytes) -> list[tuple[int, bytes]]:
    """(field number, payload) of every length-delimited top-level field, in wire order."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            out.append((tag >> 3, buf[pos : pos + n]))
            pos += n
        else:
            pos = _skip(buf, pos, wire, tag >> 3)
    return out


def _map_entries(
    buf: bytes, field: int, unique: bool = False
) -> dict[str, tensor_pb2.TensorProto]:
    """Map `field` of string -> TensorProto, in wire order.

    Read entry by entry rather than through the protobuf map: upb moves a map entry that
    carries unknown fields into the parent's unknown fields (the entry disappears), where
    the C++ runtime TFS uses skips the unknown fields and keeps the entry. A repeated key
    keeps its first position and its last value, unless `unique`: then it is refused
    (CodecError naming the first key seen twice). Repeated key/value records inside one
    entry follow protobuf's merge rules (last key wins, value messages merge).
    """
    out: dict[str, tensor_pb2.TensorProto] = {}
    for f, entry in _len_fields(buf):
        if f != field:
            continue
        key, values = _split_map_entry(entry)
        name = key.decode("utf-8")
        if unique and name in out:
            raise CodecError("INVALID_ARGUMENT", _duplicate_message(name))
        out[name] = tensor_pb2.TensorProto.FromString(b"".join(values))
    return out


def _duplicate_message(name: str) -> str:
    return f"tensor parsing error: {name}: the inputs map holds this key more than once"


def _submessage(buf: bytes, field: int) -> bytes | None:
    """All occurrences of embedded message `field`, joined (= protobuf's merge), or None."""
    parts = [payload for f, payload in _len_fields(buf) if f == field]
    return b"".join(parts) if parts else None


# --- writing ------------------------------------------------------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    value &= 0xFFFFFFFFFFFFFFFF  # negatives travel as 10-byte two's complement
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _len_field(field: int, payload: bytes) -> bytes:
    out = bytearray()
    _put_varint(out, (field << 3) | 2)
    _put_varint(out, len(payload))
    out += payload
    return bytes(out)


def _map_entry(field: int, key: str, value: bytes) -> bytes:
    return _len_field(field, _len_field(1, key.encode("utf-8")) + _len_field(2, value))


# --- TF string tensor_content (tensor_coding.cc EncodeStringList / DecodeStringList) -----


def _decode_string_list(content: bytes, n: int) -> list[bytes] | None:
    sizes = []
    pos = 0
    end = len(content)
    for _ in range(n):
        # GetVarint32: at most 5 bytes, bits past 32 dropped.
        value = 0
        for shift in range(0, 35, 7):
            if pos >= end:
                return None
            b = content[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
        else:
            return None
        sizes.append(value & 0xFFFFFFFF)
    if sum(sizes) != end - pos:
        return None
    out = []
    for size in sizes:
        out.append(content[pos : pos + size])
        pos += size
    return out


def _encode_string_list(strings: list[bytes]) -> bytes:
    out = bytearray()
    for s in strings:
        _put_varint(out, len(s))
    for s in strings:
        out += s
    return bytes(out)


# --- normalizing a TensorProto ------------------------------------------------------------


class _Mismatch(Exception):
    """The payload disagrees with the shape; callers word the CodecError."""


def _known_dims(tp: tensor_pb2.TensorProto) -> tuple[tuple[int, ...], bool]:
    dims = tuple(d.size for d in tp.tensor_shape.dim)
    known = not tp.tensor_shape.unknown_rank and all(d >= 0 for d in dims)
    return dims, known


def _typed_values(tp: tensor_pb2.TensorProto, dtype: int) -> np.ndarray:
    """The dtype's typed field as an array of normalized elements (no fill)."""
    field = _FIELD[dtype]
    values = _field_values(tp, field)
    if isinstance(values, list):
        values = np.array(values, dtype=_FIELD_VALUES[field])
    if dtype in (DT_COMPLEX64, DT_COMPLEX128):
        if len(values) % 2:
            raise _Mismatch("odd number of complex components")
        return values.view(_ELEMENT[dtype])
    # Narrowing int32 -> int8/uint8/int16/uint16 keeps the low bits, like TF's static_cast.
    return values.astype(_ELEMENT[dtype])


def _fill(values: np.ndarray, n: int) -> np.ndarray:
    """TF's FromProtoField: no values -> zeros; fewer -> repeat the last; more -> error."""
    count = len(values)
    if count == n:
        return values
    if count > n:
        raise _Mismatch(f"{count} values for {n} elements")
    if count == 0:
        return np.zeros(n, dtype=values.dtype)
    return np.concatenate([values, np.full(n - count, values[-1], dtype=values.dtype)])


def _too_large(dims: tuple[int, ...]) -> bool:
    """Whether the non-zero dimensions multiply past MAX_ELEMENTS (dims are >= 0)."""
    product = 1
    for d in dims:
        if d:
            product *= d
            if product > MAX_ELEMENTS:
                return True
    return False


def _too_large_message(dims: tuple[int, ...]) -> str:
    return (
        f"shape {_shape_text(dims)} is too large (the product of its non-zero dimensions "
        f"exceeds {MAX_ELEMENTS})"
    )


def _concrete_shape(tp: tensor_pb2.TensorProto) -> tuple[tuple[int, ...], int]:
    """(dims, element count) of a tensor that must be concrete, as a request's are: a known
    rank, no dimension below 0, a sane size and a DataType value. Raises _Mismatch; checks
    in this order (the compiled core's check_concrete keeps it)."""
    shape = tp.tensor_shape
    if len(shape.dim) > MAX_RANK:
        raise _Mismatch(f"more than {MAX_RANK} dimensions")  # TF refuses such a shape
    if not _valid_dtype(tp.dtype):
        raise _Mismatch(f"invalid dtype {tp.dtype}")
    if shape.unknown_rank:
        raise _Mismatch("unknown rank")
    dims = tuple(d.size for d in shape.dim)
    for i, d in enumerate(dims):
        if d < 0:
            raise _Mismatch(f"negative dimension {d} at index {i}")
    if _too_large(dims):
        raise _Mismatch(_too_large_message(dims))
    return dims, math.prod(dims)


def _spend(budget: list[int], cost: int) -> bool:
    """Take `cost` bytes from the request's fill budget, if it has them."""
    if cost > budget[0]:
        return False
    budget[0] -= cost
    return True


def _normalize(
    tp: tensor_pb2.TensorProto, budget: list[int] | None = None
) -> tuple[Tensor, bool]:
    """(normalized tensor, whether it can be batched). Raises _Mismatch. `budget` ([bytes])
    is what fill expansions may still allocate for this request (MAX_FILL_BYTES)."""
    dims, n = _concrete_shape(tp)
    dtype = tp.dtype
    size = _ITEMSIZE.get(dtype, -1)
    if size < 0:  # a valid dtype the core does not batch (resource, variant, float8, refs)
        return Tensor(dtype, dims, b""), False
    if budget is None:
        budget = [MAX_FILL_BYTES]
    content = tp.tensor_content
    if dtype == DT_STRING:
        if content:
            strings = _decode_string_list(content, n)
            if strings is None:
                raise _Mismatch("bad string tensor_content")
            return Tensor(dtype, dims, strings), True
        strings = list(tp.string_val)
        count = len(strings)
        if count > n:
            raise _Mismatch(f"{count} values for {n} elements")
        if count < n:
            if not _spend(budget, n * 8):
                return Tensor(dtype, dims, strings), False
            strings.extend([strings[-1] if strings else b""] * (n - count))
        return Tensor(dtype, dims, strings), True
    if content:
        if len(content) != n * size:
            raise _Mismatch(f"tensor_content of {len(content)} bytes for {n} elements")
        return Tensor(dtype, dims, content), True
    values = _typed_values(tp, dtype)
    if len(values) > n:
        raise _Mismatch(f"{len(values)} values for {n} elements")
    if len(values) < n and not _spend(budget, n * size):
        return Tensor(dtype, dims, values.tobytes()), False
    return Tensor(dtype, dims, _fill(values, n).tobytes()), True


def _batch_rows(inputs: dict[str, Tensor], batchable: bool = True) -> int:
    if not inputs or not batchable:
        return -1
    rows = -1
    for t in inputs.values():
        if not t.shape or _ITEMSIZE.get(t.dtype, -1) < 0 or any(d < 0 for d in t.shape):
            return -1
        if rows == -1:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            return -1
    return rows


# --- public API ---------------------------------------------------------------------------


def decode_tensor(data: bytes) -> Tensor:
    """Parse one serialized TensorProto into normalized form (either encoding)."""
    tp = tensor_pb2.TensorProto()
    try:
        tp.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise CodecError("INVALID_ARGUMENT", f"Could not parse TensorProto: {exc}") from None
    try:
        return _normalize(tp)[0]
    except _Mismatch as exc:
        raise CodecError("INVALID_ARGUMENT", f"tensor parsing error: {exc}") from None


def decode_predict_request(data: bytes) -> PredictCall:
    """Parse a serialized PredictRequest. Raises CodecError("INVALID_ARGUMENT", ...)."""
    data = bytes(data)
    req = predict_pb2.PredictRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as exc:
        name = _first_unparsable_input(data)
        where = "" if name is None else f"input {name}: "
        raise CodecError(
            "INVALID_ARGUMENT", f"Could not parse PredictRequest: {where}{exc}"
        ) from None
    spec = req.model_spec
    choice = spec.WhichOneof("version_choice")
    inputs: dict[str, Tensor] = {}
    batchable = True
    budget = [MAX_FILL_BYTES]
    for name, tp in _map_entries(data, 2, unique=True).items():
        try:
            tensor, ok = _normalize(tp, budget)
        except _Mismatch as exc:
            raise CodecError("INVALID_ARGUMENT", f"tensor parsing error: {name}: {exc}") from None
        inputs[name] = tensor
        batchable = batchable and ok
    raw_spec = _submessage(data, 1)
    return PredictCall(
        model_name=spec.name,
        version=spec.version.value if choice == "version" else None,
        version_label=spec.version_label if choice == "version_label" else None,
        signature_name=spec.signature_name,
        output_filter=tuple(req.output_filter),
        model_spec=b"" if raw_spec is None else raw_spec,
        inputs=inputs,
        rows=_batch_rows(inputs, batchable),
    )


def _shape_proto(tp: tensor_pb2.TensorProto, shape: Iterable[int]) -> None:
    tp.tensor_shape.SetInParent()  # an empty shape (a scalar) is still written
    for d in shape:
        tp.tensor_shape.dim.add(size=d)


def _set_typed(tp: tensor_pb2.TensorProto, dtype: int, arr: np.ndarray) -> None:
    """Fill the dtype's typed field from normalized elements."""
    field = _FIELD[dtype]
    if field in _FIELD_NUMBER:
        # float/double/complex: the packed field's bytes ARE the little-endian elements, so
        # hand them to protobuf as wire bytes (exact bits, no trip through Python floats).
        if arr.size:
            tp.MergeFromString(_len_field(_FIELD_NUMBER[field], arr.tobytes()))
        return
    if field == "int_val":
        values = arr.astype(np.int32)  # sign- or zero-extends the narrow types
    elif field == "half_val":
        values = arr.astype(np.int32)  # the 16 bits, zero-extended
    elif field == "bool_val":
        values = arr != 0
    else:
        values = arr
    getattr(tp, field).extend(values.tolist())


def _tensor_proto(dtype: int, shape: tuple[int, ...], data: bytes | list[bytes], typed: bool):
    size = _ITEMSIZE.get(dtype, -1)
    if size < 0:
        raise CodecError("INVALID_ARGUMENT", f"cannot encode dtype {dtype}")
    if any(d < 0 for d in shape):
        raise CodecError("INVALID_ARGUMENT", f"cannot encode unknown shape {shape}")
    n = math.prod(shape)
    # The stub wants the enum type; a DataType value is that int at run time.
    tp = tensor_pb2.TensorProto(dtype=dtype)  # type: ignore[arg-type]
    _shape_proto(tp, shape)
    if dtype == DT_STRING:
        assert isinstance(data, list)
        if len(data) != n:
            raise CodecError("INVALID_ARGUMENT", f"{len(data)} strings for shape {shape}")
        tp.string_val.extend(data)
        return tp
    assert isinstance(data, bytes)
    if len(data) != n * size:
        raise CodecError("INVALID_ARGUMENT", f"{len(data)} bytes for shape {shape}")
    if typed:
        _set_typed(tp, dtype, np.frombuffer(data, dtype=_ELEMENT[dtype]))
    elif data:
        tp.tensor_content = bytes(data)
    return tp


def encode_tensor(
    dtype: int, shape: tuple[int, ...], data: bytes | list[bytes], typed: bool
) -> bytes:
    """A serialized TensorProto: typed fields when `typed`, else tensor_content (strings
    always use string_val)."""
    return _tensor_proto(dtype, tuple(shape), data, typed).SerializeToString()


def encode_predict_response(outputs: dict[str, bytes], model_spec: bytes) -> bytes:
    """A serialized PredictResponse from serialized TensorProtos and a serialized ModelSpec."""
    # Written entry by entry: protobuf would serialize a map in hash order.
    parts = [_map_entry(1, name, bytes(value)) for name, value in outputs.items()]
    if model_spec:
        parts.append(_len_field(2, bytes(model_spec)))
    return b"".join(parts)


def encode_predict_request(
    pieces: list[tuple[PredictCall, int, int]], pad_rows: int = 0
) -> bytes:
    """One PredictRequest holding rows [start, stop) of each call, concatenated along dim 0,
    then `pad_rows` copies of the last row sent (an allowed batch size)."""
    if not pieces:
        raise CodecError("INTERNAL", "encode_predict_request needs at least one piece")
    if pad_rows < 0:
        raise CodecError("INTERNAL", f"negative padding of {pad_rows} rows")
    first = pieces[0][0]
    total = 0
    for call, start, stop in pieces:
        if call.rows < 0 or not 0 <= start <= stop <= call.rows:
            raise CodecError("INTERNAL", f"rows [{start}, {stop}) outside a call of {call.rows}")
        if call is not first and call.key[4] != first.key[4]:
            raise CodecError("INTERNAL", "pieces of calls with different inputs")
        total += stop - start
    if pad_rows and total == 0:
        raise CodecError("INTERNAL", "no row to pad with")
    # The padding copies the last row sent: a real row, so the model sees valid input.
    pad_call, pad_at = pieces[-1][0], 0
    for call, start, stop in pieces:
        if stop > start:
            pad_call, pad_at = call, stop - 1
    out = [_len_field(1, first.model_spec)]
    for name, tensor in first.inputs.items():
        inner = tensor.shape[1:]
        shape = (total + pad_rows, *inner)
        if tensor.dtype == DT_STRING:
            strings: list[bytes] = []
            per_row = math.prod(inner)
            for call, start, stop in pieces:
                strings.extend(call.inputs[name].strings[start * per_row : stop * per_row])
            if pad_rows:
                row = pad_call.inputs[name].strings[pad_at * per_row : (pad_at + 1) * per_row]
                strings.extend(row * pad_rows)
            tp = _tensor_proto(DT_STRING, shape, strings, True)
        else:
            row_bytes = math.prod(inner) * _ITEMSIZE[tensor.dtype]
            content = b"".join(
                call.inputs[name].content[start * row_bytes : stop * row_bytes]
                for call, start, stop in pieces
            )
            if pad_rows:
                pad = pad_call.inputs[name].content[pad_at * row_bytes : (pad_at + 1) * row_bytes]
                content += pad * pad_rows
            tp = _tensor_proto(tensor.dtype, shape, content, False)
        out.append(_map_entry(2, name, tp.SerializeToString()))
    for name in first.output_filter:
        out.append(_len_field(3, name.encode("utf-8")))
    return b"".join(out)


def pad_length(tensor: Tensor, length: int, pad: bytes) -> Tensor:
    """`tensor` with dimension 1 padded to `length` with the element `pad` (its
    little-endian bytes; for DT_STRING the string itself) after each row's own elements."""
    shape = tensor.shape
    if len(shape) < 2 or length < shape[1]:
        raise CodecError("INTERNAL", f"cannot pad shape {list(shape)} to length {length}")
    if length == shape[1]:
        return tensor
    rows, old = shape[0], shape[1]
    per = math.prod(shape[2:])
    new_shape = (rows, length, *shape[2:])
    keep, extra = old * per, (length - old) * per
    if tensor.dtype == DT_STRING:
        strings = tensor.strings
        out: list[bytes] = []
        for row in range(rows):
            out.extend(strings[row * keep : (row + 1) * keep])
            out.extend([pad] * extra)
        return Tensor(DT_STRING, new_shape, out)
    size = _ITEMSIZE.get(tensor.dtype, -1)
    if size <= 0 or len(pad) != size:
        raise CodecError("INTERNAL", f"a pad element of {len(pad)} bytes for dtype "
                                     f"{tensor.dtype}")
    content = tensor.content
    block = keep * size
    fill = pad * extra
    parts: list[bytes] = []
    for row in range(rows):
        parts.append(content[row * block : (row + 1) * block])
        parts.append(fill)
    return Tensor(tensor.dtype, new_shape, b"".join(parts))


def _split_map_entry(entry: bytes) -> tuple[bytes, list[bytes]]:
    """A map<string, TensorProto> entry's key (the last one given wins) and the pieces of its
    value, which protobuf merges when the value is given more than once."""
    key = b""
    values = []
    for field, payload in _len_fields(entry):
        if field == 1:
            key = payload
        elif field == 2:
            values.append(payload)
    return key, values


def _first_unparsable_input(data: bytes) -> str | None:
    """Best effort, for the message only: the name of the first input whose value does not
    parse on its own in a request protobuf refused. None when that cannot be told (the
    scanner is meant for valid bytes, so anything it trips on ends the search)."""
    try:
        for f, entry in _len_fields(data):
            if f != 2:
                continue
            key, values = _split_map_entry(entry)
            for value in values:
                try:
                    tensor_pb2.TensorProto.FromString(value)
                except DecodeError:
                    return key.decode("utf-8", "replace")
    except (IndexError, CodecError, RecursionError):
        return None
    return None


def _parse_response(data: bytes) -> predict_pb2.PredictResponse:
    resp = predict_pb2.PredictResponse()
    try:
        resp.ParseFromString(data)
    except DecodeError as exc:
        raise CodecError("INTERNAL", f"Could not parse PredictResponse: {exc}") from None
    return resp


def decode_predict_response(data: bytes) -> tuple[dict[str, Tensor], int | None]:
    """(outputs by name, sorted, in normalized form; the version that answered or None) of a
    serialized PredictResponse. CodecError("INTERNAL") for bytes that do not parse or an
    output that is malformed."""
    resp = _parse_response(bytes(data))
    budget = [MAX_FILL_BYTES]
    outputs: dict[str, Tensor] = {}
    for name in sorted(resp.outputs):
        try:
            tensor, ok = _normalize(resp.outputs[name], budget)
        except _Mismatch as exc:
            raise CodecError("INTERNAL", f"output {name}: {exc}") from None
        if not ok and _ITEMSIZE.get(tensor.dtype, -1) >= 0:
            raise CodecError("INTERNAL", f"output {name}: too large to expand")
        outputs[name] = tensor
    spec = resp.model_spec
    version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
    return outputs, version


def _batch_dims(name: str, tp: tensor_pb2.TensorProto) -> tuple[int, int, int]:
    """(dim 0, elements per row, bytes per element) of an output that can be cut on dim 0."""
    if len(tp.tensor_shape.dim) > MAX_RANK:
        raise CodecError("INTERNAL", f"output {name} has more than {MAX_RANK} dimensions")
    dims, known = _known_dims(tp)
    if tp.tensor_shape.unknown_rank or not dims:
        raise CodecError("FAILED_PRECONDITION", f"output {name} has no batch dimension")
    if not known:
        raise CodecError("FAILED_PRECONDITION", f"output {name} has an unknown dimension")
    if _too_large(dims):
        raise CodecError("INTERNAL", f"output {name}: {_too_large_message(dims)}")
    size = _ITEMSIZE.get(tp.dtype, -1)
    if size < 0:
        raise CodecError("FAILED_PRECONDITION", f"output {name} has unbatchable dtype {tp.dtype}")
    return dims[0], math.prod(dims[1:]), size


def _copy_header(src: tensor_pb2.TensorProto, dst: tensor_pb2.TensorProto, rows: int) -> None:
    dst.dtype = src.dtype
    dst.tensor_shape.SetInParent()
    for i, d in enumerate(src.tensor_shape.dim):
        dst.tensor_shape.dim.add(size=rows if i == 0 else d.size, name=d.name)


def _typed_count(name: str, tp: tensor_pb2.TensorProto, n: int) -> int:
    field = _FIELD[tp.dtype]
    count = len(getattr(tp, field))
    if tp.dtype in (DT_COMPLEX64, DT_COMPLEX128):
        if count % 2:
            raise CodecError("INTERNAL", f"output {name}: odd number of complex components")
        count //= 2
    if count > n:
        raise CodecError("INTERNAL", f"output {name}: {count} values for {n} elements")
    if 1 < count < n and n * max(_ITEMSIZE[tp.dtype], 8) > MAX_FILL_BYTES:
        raise CodecError("INTERNAL", f"output {name}: too large to expand")
    return count


def split_predict_response(data: bytes, rows: list[int]) -> list[bytes]:
    """Cut a serialized PredictResponse along dim 0 into len(rows) responses of rows[i] rows
    each, keeping the replica's encoding and echoing its model_spec."""
    data = bytes(data)
    _parse_response(data)  # validates the whole message
    total = sum(rows)
    if any(r < 0 for r in rows):
        raise CodecError("INTERNAL", f"negative row count in {rows}")
    parts: list[list[bytes]] = [[] for _ in rows]
    for name, tp in _map_entries(data, 1).items():
        dim0, per_row, size = _batch_dims(name, tp)
        if dim0 != total:
            raise CodecError(
                "FAILED_PRECONDITION",
                f"output {name} has dimension 0 of {dim0}, expected {total}",
            )
        n = total * per_row
        outs = [tensor_pb2.TensorProto() for _ in rows]
        for out, r in zip(outs, rows, strict=True):
            _copy_header(tp, out, r)
        content = tp.tensor_content
        if content and tp.dtype == DT_STRING:
            strings = _decode_string_list(content, n)
            if strings is None:
                raise CodecError("INTERNAL", f"output {name}: bad string tensor_content")
            pos = 0
            for out, r in zip(outs, rows, strict=True):
                k = r * per_row
                if k:
                    out.tensor_content = _encode_string_list(strings[pos : pos + k])
                pos += k
        elif content:
            if len(content) != n * size:
                raise CodecError(
                    "INTERNAL", f"output {name}: tensor_content of {len(content)} bytes"
                )
            pos = 0
            for out, r in zip(outs, rows, strict=True):
                k = r * per_row * size
                if k:
                    out.tensor_content = content[pos : pos + k]
                pos += k
        else:
            count = _typed_count(name, tp, n)
            if count:
                field = _FIELD[tp.dtype]
                per = 2 if tp.dtype in (DT_COMPLEX64, DT_COMPLEX128) else 1
                values = _field_values(tp, field)
                if count == 1 and n > 1:
                    # The one-value form: every non-empty part gets the single value too.
                    for out, r in zip(outs, rows, strict=True):
                        if r * per_row:
                            _append_values(out, field, values)
                else:
                    if count < n:  # the fill rule: repeat the last value
                        values = _expand(values, per, n)
                    pos = 0
                    for out, r in zip(outs, rows, strict=True):
                        k = r * per_row * per
                        _append_values(out, field, values[pos : pos + k])
                        pos += k
        for part, out in zip(parts, outs, strict=True):
            part.append(_map_entry(1, name, out.SerializeToString()))
    spec = _submessage(data, 2)
    if spec is not None:
        tail = _len_field(2, spec)
        for part in parts:
            part.append(tail)
    return [b"".join(part) for part in parts]


def _field_values(tp: tensor_pb2.TensorProto, field: str) -> np.ndarray | list:
    """A typed field's components: a numpy array holding the exact bits for the fixed-width
    fields (a trip through Python floats would quiet signalling NaNs), else a list."""
    if field not in _FIELD_NUMBER:
        return list(getattr(tp, field))
    if not len(getattr(tp, field)):
        return np.zeros(0, dtype=_FIELD_VALUES[field])
    number = _FIELD_NUMBER[field]
    # protobuf writes a repeated scalar field as one packed record.
    for f, payload in _len_fields(tp.SerializeToString()):
        if f == number:
            return np.frombuffer(payload, dtype=_FIELD_VALUES[field])
    raise AssertionError("packed field not found")  # pragma: no cover


def _expand(values: np.ndarray | list, per: int, n: int) -> np.ndarray | list:
    """Pad `values` to n elements (per components each) by repeating the last element."""
    missing = n - len(values) // per
    if isinstance(values, np.ndarray):
        return np.concatenate([values, np.tile(values[-per:], missing)])
    return values + values[-per:] * missing


def _append_values(out: tensor_pb2.TensorProto, field: str, values: np.ndarray | list) -> None:
    if not len(values):
        return
    if isinstance(values, np.ndarray):
        out.MergeFromString(_len_field(_FIELD_NUMBER[field], values.tobytes()))
    else:
        getattr(out, field).extend(values)


def concat_predict_responses(parts: list[bytes]) -> bytes:
    """Join responses for consecutive row ranges of one request back into one response,
    along dim 0, in the encoding of the first part."""
    if not parts:
        raise CodecError("INTERNAL", "concat_predict_responses needs at least one part")
    if len(parts) == 1:
        return bytes(parts[0])
    datas = [bytes(p) for p in parts]
    for d in datas:
        _parse_response(d)  # validates
    maps = [_map_entries(d, 1) for d in datas]
    names = list(maps[0])
    out_entries = []
    for name in names:
        tps = []
        for outputs in maps:
            if name not in outputs:
                raise CodecError("INTERNAL", f"output {name} missing from a part")
            tps.append(outputs[name])
        head = tps[0]
        dims0 = []
        for tp in tps:
            dim0, _, _ = _batch_dims(name, tp)
            inner = tuple(d.size for d in tp.tensor_shape.dim)[1:]
            if tp.dtype != head.dtype or inner != tuple(d.size for d in head.tensor_shape.dim)[1:]:
                raise CodecError("FAILED_PRECONDITION", f"output {name} differs between parts")
            dims0.append(dim0)
        total = sum(dims0)
        # Normalize every part (fills the one-value form) and re-encode in the first part's
        # encoding: typed unless the first part used tensor_content.
        try:
            normalized = [_normalize(tp) for tp in tps]
        except _Mismatch as exc:
            raise CodecError("INTERNAL", f"output {name}: {exc}") from None
        if not all(ok for _, ok in normalized):
            raise CodecError("INTERNAL", f"output {name} cannot be joined")
        tensors = [t for t, _ in normalized]
        # A part of no rows carries no payload and cannot tell the encoding: the first part
        # that has rows decides.
        decider = next((tp for tp, d in zip(tps, dims0, strict=True) if d), None)
        typed = decider is None or not decider.tensor_content
        if head.dtype == DT_STRING:
            strings = [s for t in tensors for s in t.strings]
            merged = tensor_pb2.TensorProto()
            _copy_header(head, merged, total)
            if typed:
                merged.string_val.extend(strings)
            elif strings:
                merged.tensor_content = _encode_string_list(strings)
        else:
            content = b"".join(t.content for t in tensors)
            merged = tensor_pb2.TensorProto()
            _copy_header(head, merged, total)
            if typed:
                _set_typed(merged, head.dtype, np.frombuffer(content, _ELEMENT[head.dtype]))
            elif content:
                merged.tensor_content = content
        out_entries.append(_map_entry(1, name, merged.SerializeToString()))
    spec = _submessage(datas[0], 2)
    if spec is not None:
        out_entries.append(_len_field(2, spec))
    return b"".join(out_entries)


# --- JSON text of a numeric tensor (the REST answer) --------------------------------------

# struct codes of the dtypes json_numbers writes.
_JSON_CODES = {
    dtypes.DT_FLOAT: "f", dtypes.DT_DOUBLE: "d", dtypes.DT_INT32: "i", dtypes.DT_UINT8: "B",
    dtypes.DT_INT16: "h", dtypes.DT_INT8: "b", dtypes.DT_INT64: "q", dtypes.DT_BOOL: "B",
    dtypes.DT_UINT32: "I", dtypes.DT_UINT64: "Q",
}
# The plain (not exponent) form's range of point positions (value = 0.D * 10**kk), as
# orjson lays numbers out: float32, float64.
_PLAIN_F32 = (-5, 13)
_PLAIN_F64 = (-4, 16)


def _digits_of(text: str) -> tuple[str, int]:
    """(significant digits, point position) of a positive decimal text such as "1.5e+16",
    "0.0001" or "123.0"; ("", 0) for zero."""
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    stripped = digits.lstrip("0")
    kk = len(whole) - (len(digits) - len(stripped)) + int(exponent or 0)
    stripped = stripped.rstrip("0")
    return stripped, kk if stripped else 0


def _lay_out(negative: bool, digits: str, kk: int, plain: tuple[int, int]) -> str:
    sign = "-" if negative else ""
    n = len(digits)
    if plain[0] <= kk <= 0:
        return f"{sign}0.{'0' * -kk}{digits}"
    if 0 < kk <= plain[1]:
        if kk >= n:
            return f"{sign}{digits}{'0' * (kk - n)}.0"
        return f"{sign}{digits[:kk]}.{digits[kk:]}"
    e = kk - 1
    head = digits[0] + ("." + digits[1:] if n > 1 else "")
    return f"{sign}{head}e{'+' if e >= 0 else ''}{e}"


def _as_float32(text: str) -> float | None:
    try:
        return struct.unpack("<f", struct.pack("<f", float(text)))[0]
    except OverflowError:
        return None


def _float32_digits(a: float) -> tuple[str, int]:
    """The shortest digits that read back as the float32 `a` (> 0), as the compiled core
    finds them: the nearest p-digit decimal, or where `a` is a power of two (whose interval
    is narrower below) the next one up."""
    for p in range(1, 10):
        text = f"{a:.{p - 1}e}"
        if _as_float32(text) == a:
            return _digits_of(text)
        if float(text) < a:
            mantissa, _, exponent = text.partition("e")
            raised = int(mantissa.replace(".", "")) + 1
            up = f"{raised}e{int(exponent) - (p - 1)}"
            if _as_float32(up) == a:
                return _digits_of(up)
    raise AssertionError(f"no float32 digits for {a!r}")  # nine digits always read back


def _float_text(v: float, single: bool) -> str | None:
    if not math.isfinite(v):
        return None
    if v == 0:
        return "-0.0" if math.copysign(1.0, v) < 0 else "0.0"
    a = abs(v)
    if single:
        digits, kk = _float32_digits(a)
        return _lay_out(v < 0, digits, kk, _PLAIN_F32)
    digits, kk = _digits_of(repr(a))
    return _lay_out(v < 0, digits, kk, _PLAIN_F64)


def _nest_text(texts: list[str], shape: tuple[int, ...]) -> str:
    if not shape:
        return texts[0]
    if len(shape) == 1:
        return "[" + ",".join(texts) + "]"
    step = len(texts) // shape[0]
    return "[" + ",".join(_nest_text(texts[i * step:(i + 1) * step], shape[1:])
                          for i in range(shape[0])) + "]"


def json_numbers(dtype: int, shape: tuple[int, ...], data: bytes) -> bytes | None:
    code = _JSON_CODES.get(dtype)
    if code is None or type(data) is not bytes or any(d <= 0 for d in shape):
        return None
    count = math.prod(shape)
    if len(data) != count * struct.calcsize(code):
        return None
    values = struct.unpack(f"<{count}{code}", data)
    texts: list[str] = []
    if dtype == dtypes.DT_FLOAT or dtype == dtypes.DT_DOUBLE:
        single = dtype == dtypes.DT_FLOAT
        for v in values:
            text = _float_text(v, single)
            if text is None:
                return None
            texts.append(text)
    elif dtype == dtypes.DT_BOOL:
        texts = ["true" if v else "false" for v in values]
    else:
        texts = [str(v) for v in values]
    return _nest_text(texts, shape).encode()
