"""JSON <-> tensors by TensorFlow Serving's REST rules (TFS's json_tensor.cc), as pure functions.

Requests: a JSON body becomes typed tensors. JSON has one number type, so the dtype of every
value comes from the model's signature. Responses: tensors become TFS's `predictions` (row
format) or `outputs` (columnar) JSON. Classify and regress bodies become tensorflow.Example
messages, and their results JSON. Every refusal is a ProxyError carrying TFS's code and
wording.

A request tensor takes one of two paths. numpy converts a well-formed nested list in one C
call: that is the common case and the fast one. numpy cannot vouch for everything, though:
strings, b64 objects, booleans (numpy quietly turns them into numbers), ragged lists, null,
and values near the limits of the target dtype. Those go through a walk that copies TFS's
FillTensorProto value by value, so TFS decides what is accepted and how refusals are worded.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import grpc
import numpy as np
import orjson
from google.protobuf import json_format

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.errors import ProxyError
from batchproxy.frontends import json_text
from batchproxy.protos import (
    example_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
)

ROW = "row"  # the request used "instances"; the answer is "predictions"
COLUMNAR = "columnar"  # the request used "inputs"; the answer is "outputs"

_NUMPY = orjson.OPT_SERIALIZE_NUMPY

# Dtypes TFS converts JSON values to (json_tensor.cc AddValueToTensor); others are 501.
_INT32_TYPES = (dtypes.DT_INT32, dtypes.DT_INT16, dtypes.DT_INT8, dtypes.DT_UINT8)
_INT_RANGE: dict[int, tuple[int, int]] = {
    **{dtype: (-(2**31), 2**31 - 1) for dtype in _INT32_TYPES},
    dtypes.DT_INT64: (-(2**63), 2**63 - 1),
    dtypes.DT_UINT32: (0, 2**32 - 1),
    dtypes.DT_UINT64: (0, 2**64 - 1),
}
# The largest integer a float type holds exactly: a JSON integer beyond it is refused as lossy.
_LOSSLESS_INT = {dtypes.DT_FLOAT: 2**24 - 1, dtypes.DT_DOUBLE: 2**53 - 1}
_FLOAT_MAX = {dtypes.DT_FLOAT: float(np.finfo(np.float32).max), dtypes.DT_DOUBLE: math.inf}
# What TFS can write back (AddSingleValueAndAdvance), plus half, which numpy writes as floats.
_WRITABLE = {
    dtypes.DT_FLOAT, dtypes.DT_DOUBLE, dtypes.DT_INT32, dtypes.DT_INT16, dtypes.DT_INT8,
    dtypes.DT_UINT8, dtypes.DT_STRING, dtypes.DT_INT64, dtypes.DT_BOOL, dtypes.DT_UINT32,
    dtypes.DT_UINT64, dtypes.DT_HALF,
}
_FLOATING = {dtypes.DT_FLOAT, dtypes.DT_DOUBLE, dtypes.DT_HALF}
# A rapidjson integer: what it parses as int64/uint64 (bigger literals become doubles).
_JSON_INT_MIN, _JSON_INT_MAX = -(2**63), 2**64 - 1


class JsonTensor(NamedTuple):
    """A tensor in the core's normalized form (core.Tensor takes the same three fields)."""

    dtype: int
    shape: tuple[int, ...]
    data: bytes | list[bytes]


class TensorLike(Protocol):
    dtype: int
    shape: tuple[int, ...]
    data: bytes | list[bytes]


class JsonDoc(NamedTuple):
    """A parsed request body and its text. (A NamedTuple: one is built per call, and a
    frozen dataclass's __init__ costs a microsecond of object.__setattr__ calls.)"""

    value: dict[str, Any]
    body: bytes

    @property
    def may_have_bools(self) -> bool:
        """False when the body holds no `true` or `false` token: then numbers can take
        numpy's path, which cannot tell 1 from true. Asked only on that path (the two
        searches cost more than a small tensor's whole conversion)."""
        return b"true" in self.body or b"false" in self.body


def invalid(message: str) -> ProxyError:
    return ProxyError(grpc.StatusCode.INVALID_ARGUMENT, message)


# --- JSON text for error messages -----------------------------------------------------------


def _number_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def value_text(value: Any) -> str:
    """A JSON value as TFS quotes it in error messages (NaN and Infinity spelled out)."""
    if isinstance(value, float):
        return _number_text(value)
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):  # ints beyond 64 bits
        return json.dumps(value, separators=(",", ":"))


def _type_text(value: Any) -> str:
    """rapidjson's type names (JsonTypeString)."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _status_text(err: ProxyError) -> str:
    """absl::Status::ToString, which TFS embeds when it wraps an error in another."""
    return f"{err.code.name}: {err.message}"


def _shape_text(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# --- parsing the body -----------------------------------------------------------------------


def loads(body: bytes) -> JsonDoc:
    """Parse a request body, which must be a JSON object. NaN, Infinity and -Infinity are
    accepted, as TFS accepts them (rapidjson's kParseNanAndInfFlag)."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses the NaN/Infinity literals; Python's parser takes them. Only bodies
        # orjson refused pay for the slower parser, and only text it could have taken.
        try:
            value = json.loads(json_text.body_text(body), parse_float=_finite_float)
        except (ValueError, RecursionError) as err:
            raise invalid(f"JSON Parse error: {err}") from None
    if not isinstance(value, dict):
        raise invalid(f"JSON Value: {value_text(value)} Is not object")
    return JsonDoc(value, body)


def _finite_float(text: str) -> float:
    """A JSON number literal; one too big for a double is an error, as in TFS's parser
    (only the NaN/Infinity literals stand for those values)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"Number too big to be stored in double: {text[:40]}")
    return value


def signature_name(doc: JsonDoc) -> str:
    """The optional `signature_name` ("" when absent: the caller resolves the default)."""
    name = doc.value.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(
            f"JSON Value: {value_text(doc.value)} not formatted correctly. "
            "'signature_name' key must be a string value."
        )
    return name


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_element_object(value: Any) -> bool:
    """An instance given as {input name: value}, as opposed to a b64 object."""
    return isinstance(value, dict) and not _is_b64(value)


def _b64decode(value: Any) -> bytes:
    if not _is_b64(value):
        raise invalid(f"JSON Value: {value_text(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:
        # absl::Base64Unescape takes padded and unpadded input alike.
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("Unable to base64 decode") from None


def _type_error(value: Any, dtype: int) -> ProxyError:
    return invalid(
        f"JSON Value: {value_text(value)} Type: {_type_text(value)} "
        f"is not of expected type: {dtypes.tf_name(dtype)}"
    )


def _lossy(value: Any, target: str) -> ProxyError:
    return invalid(
        f"Cannot convert JSON value: {value_text(value)} to {target} without loss of precision."
    )


def _scalar(value: Any, dtype: int) -> Any:
    """One JSON leaf as a Python value of `dtype`, or TFS's refusal (AddValueToTensor)."""
    if dtype in _LOSSLESS_INT:
        if type(value) is bool or not isinstance(value, int | float):
            raise _type_error(value, dtype)
        if isinstance(value, int) and _JSON_INT_MIN <= value <= _JSON_INT_MAX:
            if abs(value) > _LOSSLESS_INT[dtype]:
                raise _lossy(value, dtypes.tf_name(dtype))
            return value
        number = float(value)
        if math.isfinite(number) and abs(number) > _FLOAT_MAX[dtype]:
            raise _lossy(value, dtypes.tf_name(dtype))
        return number
    bounds = _INT_RANGE.get(dtype)
    if bounds is not None:
        if type(value) is bool or not isinstance(value, int) or not (
            bounds[0] <= value <= bounds[1]
        ):
            raise _type_error(value, dtype)
        return value
    if dtype == dtypes.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode("utf-8", "surrogatepass")
    if dtype == dtypes.DT_BOOL:
        if type(value) is not bool:
            raise _type_error(value, dtype)
        return value
    raise ProxyError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"Conversion of JSON Value: {value_text(value)} to type: {dtypes.tf_name(dtype)}",
    )


def _dense_shape(value: Any) -> tuple[int, ...]:
    """The shape the first element of every level implies (GetDenseTensorShape)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _fill(value: Any, level: int, shape: tuple[int, ...], dtype: int, out: list[Any]) -> None:
    """Append the leaves of `value` to `out`, checking them against `shape` (FillTensorProto)."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid(
                f"JSON Value: {value_text(value)} found at incorrect level: {level + 1} "
                f"in the JSON DOM. Expected at level: {rank}"
            )
        if isinstance(value, dict):
            if dtype != dtypes.DT_STRING:
                raise _type_error(value, dtype)
            out.append(_b64decode(value))
        else:
            out.append(_scalar(value, dtype))
        return
    if level >= rank:
        raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _pack(dtype: int, shape: tuple[int, ...], values: list[Any]) -> JsonTensor:
    """Checked leaves -> normalized tensor bytes (integers wrap like TF's narrowing casts)."""
    if dtype == dtypes.DT_STRING:
        return JsonTensor(dtype, shape, values)
    target = dtypes.NUMPY_DTYPES.get(dtype)
    if target is None:  # no leaves reached _scalar's refusal: an empty tensor
        return JsonTensor(dtype, shape, b"")
    if dtype in _INT_RANGE:
        wide = np.uint64 if dtype == dtypes.DT_UINT64 else np.int64
        array = np.array(values, dtype=wide).astype(target)
    elif dtype in _LOSSLESS_INT:
        array = np.array(values, dtype=np.float64).astype(target)
    else:
        array = np.array(values, dtype=target)
    return JsonTensor(dtype, shape, array.tobytes())


# Up to this many values, a check over a tensor's values is a Python loop over tolist():
# one numpy reduction costs a few microseconds whatever the size, more than the loop over a
# few values (a one-row call's whole tensor, most often).
SMALL = 16


def _within(array: np.ndarray, low: float, high: float) -> bool:
    """Whether every value lies in [low, high] (a NaN does not)."""
    if array.size <= SMALL:
        return all(low <= v <= high for v in array.ravel().tolist())
    return bool(low <= array.min() and array.max() <= high)  # NaN: both are NaN, False


def _finite(array: np.ndarray) -> bool:
    """Whether no value is NaN or infinite."""
    if array.size <= SMALL:
        return all(map(math.isfinite, array.ravel().tolist()))
    return bool(np.isfinite(array).all())


# Up to this many values, a tensor of plain numbers is converted by a walk in Python and
# struct: numpy's array creation, checks and casts cost more than that for a few values.
SMALL_TENSOR = 32

_STRUCT_CODES = {
    dtypes.DT_FLOAT: "f", dtypes.DT_DOUBLE: "d", dtypes.DT_INT32: "i", dtypes.DT_INT64: "q",
    dtypes.DT_UINT32: "I", dtypes.DT_UINT64: "Q",
}
# Narrow integer types travel as int_val (int32) and are cut to their width, as TF's
# narrowing casts do: (struct code of the unsigned width, mask).
_NARROW = {dtypes.DT_INT16: ("H", 0xFFFF), dtypes.DT_INT8: ("B", 0xFF),
           dtypes.DT_UINT8: ("B", 0xFF)}


def _small_leaves(value: Any) -> tuple[tuple[int, ...], list[Any]] | None:
    """(shape, row-major leaves) of a dense nested list of at most SMALL_TENSOR leaves, or
    None (ragged, too big). Leaves are not checked here: a list among them (a ragged
    deeper level) fails the caller's type check."""
    if type(value) is not list:
        return (), [value]
    rows = len(value)
    if not rows or type(value[0]) is not list:  # rank 1, the usual column of one-row calls
        return ((rows,), value) if rows <= SMALL_TENSOR else None
    first = value[0]
    if not first or type(first[0]) is not list:  # rank 2, the usual instances list
        width = len(first)
        if rows * width > SMALL_TENSOR:
            return None
        flat: list[Any] = []
        for row in value:
            if type(row) is not list or len(row) != width:
                return None
            flat += row
        return (rows, width), flat
    shape = _dense_shape(value)
    level = [value]
    count = 1
    for size in shape:
        count *= size
        if count > SMALL_TENSOR:
            return None
        flat = []
        for item in level:
            if type(item) is not list or len(item) != size:
                return None
            flat += item
        level = flat
    return shape, level


def _small(value: Any, dtype: int) -> JsonTensor | None:
    """A small tensor of plain JSON numbers (or booleans for DT_BOOL) packed without numpy,
    when every value is surely accepted as is; None sends it down the other paths, which
    decide everything else (NaN, Infinity, values near the limits, wrong types)."""
    found = _small_leaves(value)
    if found is None:
        return None
    shape, leaves = found
    if dtype == dtypes.DT_BOOL:
        for v in leaves:
            if type(v) is not bool:
                return None
        return JsonTensor(dtype, shape, bytes(leaves))
    limit = _LOSSLESS_INT.get(dtype)
    if limit is not None:
        # An integer or a finite float within the type's exact integer range: one C cast
        # away from the float element (the numpy path's own condition).
        for v in leaves:
            kind = type(v)
            if (kind is not float and kind is not int) or not -limit <= v <= limit:
                return None  # NaN fails the comparison too
    else:
        bounds = _INT_RANGE.get(dtype)
        if bounds is None:
            return None
        low, high = bounds
        for v in leaves:
            if type(v) is not int or not low <= v <= high:
                return None
        narrow = _NARROW.get(dtype)
        if narrow is not None:
            code, mask = narrow
            return JsonTensor(dtype, shape,
                              struct.pack(f"<{len(leaves)}{code}", *[v & mask for v in leaves]))
    return JsonTensor(dtype, shape, struct.pack(f"<{len(leaves)}{_STRUCT_CODES[dtype]}", *leaves))


def _fast(value: Any, dtype: int, doc: JsonDoc) -> JsonTensor | None:
    """`value` converted without the careful walk, when the result is surely TFS's: small
    tensors in plain Python, others by numpy; None otherwise."""
    if dtype == dtypes.DT_STRING or dtype not in dtypes.NUMPY_DTYPES:
        return None
    small = _small(value, dtype)
    if small is not None:
        return small
    array = _fast_numpy(value, dtype, doc.may_have_bools)
    return None if array is None else JsonTensor(dtype, array.shape, array.tobytes())


def _fast_numpy(value: Any, dtype: int, may_have_bools: bool) -> np.ndarray | None:
    """`value` converted by numpy, when numpy's result is surely TFS's; None otherwise."""
    if may_have_bools and dtype != dtypes.DT_BOOL:
        return None  # numpy would read true as 1
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged, or not numbers at all
        return None
    kind = array.dtype.kind
    target = dtypes.NUMPY_DTYPES[dtype]
    if dtype == dtypes.DT_BOOL:
        return array if kind == "b" else None
    if kind == "f":
        # Only floats: the JSON numbers may have been integers, which TFS refuses beyond the
        # type's exact range, and NaN/Infinity or huge values need the careful walk.
        limit = _LOSSLESS_INT.get(dtype)
        if limit is None or not _within(array, -limit, limit):
            return None
        return array.astype(target)
    if kind in "iu":
        if dtype in _LOSSLESS_INT:
            low, high = -_LOSSLESS_INT[dtype], _LOSSLESS_INT[dtype]
        elif dtype in _INT_RANGE:
            low, high = _INT_RANGE[dtype]
        else:
            return None
        if not _within(array, low, high):
            return None
        if dtype in _INT32_TYPES:
            array = array.astype(np.int32)  # then narrow, wrapping as TF's int_val does
        return array.astype(target)
    return None


def _tensor(value: Any, dtype: int, doc: JsonDoc) -> JsonTensor:
    tensor = _fast(value, dtype, doc)
    if tensor is not None:
        return tensor
    shape = _dense_shape(value)
    values: list[Any] = []
    _fill(value, 0, shape, dtype, values)
    return _pack(dtype, shape, values)


def _fast_instances(
    instances: list[Any], inputs: Mapping[str, int], objects: bool, doc: JsonDoc
) -> dict[str, JsonTensor] | None:
    """Row format through numpy, or None when anything needs the careful walk."""
    if objects:
        names = inputs.keys()
        if not all(_is_element_object(item) and item.keys() == names for item in instances):
            return None
        columns = {name: [item[name] for item in instances] for name in inputs}
    else:
        for item in instances:  # a loop, not any(): no generator per call
            if _is_element_object(item):
                return None
        name = next(iter(inputs))
        tensor = _fast(instances, inputs[name], doc)
        return None if tensor is None else {name: tensor}
    tensors = {}
    for name, column in columns.items():
        tensor = _fast(column, inputs[name], doc)
        if tensor is None:
            return None
        tensors[name] = tensor
    return tensors


class _Column:
    """One input's values gathered over the instances, with the shape of the first."""

    __slots__ = ("shape", "size", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.shape: tuple[int, ...] | None = None
        self.size = 0


def _add_instance_item(value: Any, name: str, inputs: Mapping[str, int],
                       columns: dict[str, _Column]) -> None:
    """TFS's AddInstanceItem: one instance's value for one input."""
    if name not in inputs:
        raise invalid(f"JSON object: does not have named input: {name}")
    column = columns.setdefault(name, _Column())
    shape = _dense_shape(value)
    before = len(column.values)
    _fill(value, 0, shape, inputs[name], column.values)
    size = len(column.values) - before
    if column.shape is None:
        column.shape, column.size = shape, size
    elif column.size != size:
        raise invalid(f"Expecting tensor size: {column.size} but got: {size}")
    elif column.shape != shape:
        raise invalid(
            f"Expecting shape {_shape_text(column.shape)} but got: {_shape_text(shape)}"
        )


def _careful_instances(
    instances: list[Any], inputs: Mapping[str, int], objects: bool
) -> dict[str, JsonTensor]:
    """TFS's FillTensorMapFromInstancesList, step for step: same checks, same order."""
    columns: dict[str, _Column] = {}
    names = sorted(inputs)
    first_name = next(iter(inputs))
    for index, item in enumerate(instances):
        if objects:
            if not _is_element_object(item):
                raise invalid(f"Expecting object but got list at item {index} of input list")
            for name, value in item.items():
                try:
                    _add_instance_item(value, name, inputs, columns)
                except ProxyError as err:
                    raise invalid(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: {_status_text(err)}"
                    ) from None
            if sorted(item) != names:
                raise invalid(
                    f"Failed to process element: {index} of 'instances' list. "
                    f"JSON object: {value_text(item)} keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_element_object(item):
                raise invalid(
                    f"Expecting value/list but got object at item {index} of input list"
                )
            try:
                _add_instance_item(item, first_name, inputs, columns)
            except ProxyError as err:
                raise invalid(
                    f"Failed to process element: {index} of 'instances' list. "
                    f"Error: {_status_text(err)}"
                ) from None
    count = len(instances)
    return {
        name: _pack(inputs[name], (count, *(column.shape or ())), column.values)
        for name, column in columns.items()
    }


def _parse_instances(doc: JsonDoc, inputs: Mapping[str, int]) -> dict[str, JsonTensor]:
    instances = doc.value["instances"]
    if not isinstance(instances, list):
        raise invalid(
            f"JSON Value: {value_text(doc.value)} Excepting 'instances' to be an list/array"
        )
    if not instances:
        raise invalid(f"JSON Value: {value_text(doc.value)} No values in 'instances' array")
    # TFS tests IsObject() here, which a b64 object passes too.
    if not isinstance(instances[0], dict) and len(inputs) > 1:
        raise invalid(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    objects = _is_element_object(instances[0])
    tensors = _fast_instances(instances, inputs, objects, doc)
    if tensors is None:
        tensors = _careful_instances(instances, inputs, objects)
    return tensors


def _parse_inputs(doc: JsonDoc, inputs: Mapping[str, int]) -> dict[str, JsonTensor]:
    value = doc.value["inputs"]
    if not isinstance(value, dict) or _is_b64(value):
        if len(inputs) > 1:
            raise invalid(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        name = next(iter(inputs))
        return {name: _tensor(value, inputs[name], doc)}
    tensors = {}
    # TFS walks the signature's inputs, so keys the signature lacks are ignored, as there.
    for name in sorted(inputs):
        if name not in value:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = _tensor(value[name], inputs[name], doc)
    return tensors


def parse_predict(
    doc: JsonDoc, inputs: Mapping[str, int], signature: str = ""
) -> tuple[str, dict[str, JsonTensor]]:
    """(ROW or COLUMNAR, tensors by input name) from a predict body, typed by `inputs`
    (the signature's input names and dtypes). `signature` only words an error."""
    if not inputs:
        raise invalid(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    has_instances = "instances" in doc.value
    has_inputs = "inputs" in doc.value
    if has_instances and has_inputs:
        raise invalid(
            f"JSON Value: {value_text(doc.value)} Not formatted correctly expecting only one "
            "of 'inputs' or 'instances' keys to exist "
        )
    try:
        if has_instances:
            return ROW, _parse_instances(doc, inputs)
        if has_inputs:
            return COLUMNAR, _parse_inputs(doc, inputs)
    except RecursionError:
        raise invalid("JSON Parse error: nested too deeply") from None
    raise invalid("Missing 'inputs' or 'instances' key")


# --- writing tensors ------------------------------------------------------------------------

_NON_FINITE = {"nan": b"NaN", "inf": b"Infinity", "-inf": b"-Infinity"}


def _float_fragment(array: np.ndarray | np.generic) -> orjson.Fragment:
    """orjson writes NaN and Infinity as null; TFS writes them as NaN, Infinity, -Infinity.
    In a float tensor's JSON every null is a non-finite value, in order: put them back."""
    text = orjson.dumps(array, option=_NUMPY)
    flat = np.asarray(array).ravel()
    words = iter([_NON_FINITE[str(v)] for v in flat[~np.isfinite(flat)].astype(np.float64)])
    return orjson.Fragment(re.sub(rb"null", lambda _: next(words), text))


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """Row-major `flat` as nested lists of `shape` (a scalar for shape ())."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class _Output:
    """One output tensor ready for orjson: whole, or row by row."""

    __slots__ = ("array", "nested", "non_finite")

    def __init__(self, name: str, tensor: TensorLike) -> None:
        dtype, shape, data = tensor.dtype, tuple(tensor.shape), tensor.data
        self.array: np.ndarray | None = None
        self.nested: Any = None
        self.non_finite = False
        if dtype == dtypes.DT_STRING:
            strings = [bytes(s) for s in data]
            if name.endswith("_bytes"):  # TFS's convention for binary strings
                values: list[Any] = [{"b64": base64.b64encode(s).decode()} for s in strings]
            else:
                values = [s.decode("utf-8", "replace") for s in strings]
            self.nested = _nest(values, shape) if math.prod(shape) else _empty(shape)
            return
        if dtype not in _WRITABLE or dtype not in dtypes.NUMPY_DTYPES:
            if math.prod(shape):
                raise invalid(
                    f"Failed to write JSON value for tensor type: {dtypes.tf_name(dtype)}"
                )
            self.nested = _empty(shape)
            return
        self.array = dtypes.to_numpy(dtype, shape, data)
        self.non_finite = dtype in _FLOATING and not _finite(self.array)

    def whole(self) -> Any:
        if self.array is None:
            return self.nested
        array = self.array if self.array.ndim else self.array[()]
        return _float_fragment(array) if self.non_finite else array

    def row(self, index: int) -> Any:
        if self.array is None:
            return self.nested[index]
        row = self.array[index]
        return _float_fragment(row) if self.non_finite else row


def _empty(shape: tuple[int, ...]) -> Any:
    """Nested empty lists of a shape with a zero in it ([2, 0] -> [[], []])."""
    if not shape or shape[0] == 0:
        return []
    return [_empty(shape[1:]) for _ in range(shape[0])]


# Up to this many values an output's JSON is written by the codec (codec.json_numbers) from
# the answer's bytes: no numpy array, no orjson call. Beyond, numpy and orjson's vectorized
# writer are the cheaper (the codec finds float32's shortest digits value by value;
# benchmarks/rest_json_writer.py). The pure-Python core's writer is slower than numpy at
# any size: with it, never.
DIRECT_VALUES = 16 if codec.IMPLEMENTATION == "cython" else 0


def _direct_response(outputs: Mapping[str, TensorLike], fmt: str) -> bytes | None:
    """The answer written by the codec, when every output is a small numeric tensor with
    finite values and the layout is not rows of several outputs; None otherwise."""
    if fmt == ROW and len(outputs) > 1:
        return None
    texts = []
    for name, tensor in outputs.items():
        shape = tuple(tensor.shape)
        if math.prod(shape) > DIRECT_VALUES:
            return None
        text = codec.json_numbers(tensor.dtype, shape, tensor.data)  # type: ignore[arg-type]
        if text is None:
            return None
        texts.append((name, text))
    key = b'{"predictions":' if fmt == ROW else b'{"outputs":'
    if len(texts) == 1:
        return key + texts[0][1] + b"}"
    return key + b"{" + b",".join(orjson.dumps(name) + b":" + text
                                  for name, text in texts) + b"}}"


def predict_response(outputs: Mapping[str, TensorLike], fmt: str) -> bytes:
    """TFS's answer to a predict request of format `fmt` (MakeJsonFromTensors)."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    if fmt == ROW:
        batch = -1
        for name, tensor in outputs.items():
            if not tensor.shape:
                raise invalid(f"Tensor name: {name} has no shape information ")
            rows = tensor.shape[0]
            if batch >= 0 and rows != batch:
                raise invalid(
                    f"Tensor name: {name} has inconsistent batch size: {rows} "
                    f"expecting: {batch}"
                )
            batch = rows
    direct = _direct_response(outputs, fmt)
    if direct is not None:
        return direct
    prepared = {name: _Output(name, tensor) for name, tensor in outputs.items()}
    if fmt == ROW:
        if len(prepared) == 1:
            # One output: the tensor itself is the list over the batch.
            body: Any = {"predictions": next(iter(prepared.values())).whole()}
        else:
            body = {
                "predictions": [
                    {name: out.row(i) for name, out in prepared.items()} for i in range(batch)
                ]
            }
    elif len(prepared) == 1:
        body = {"outputs": next(iter(prepared.values())).whole()}
    else:
        body = {"outputs": {name: out.whole() for name, out in prepared.items()}}
    return orjson.dumps(body, option=_NUMPY)


def error_body(message: str) -> bytes:
    """{"error": message}, whatever the message holds: one that is not valid text (a lone
    surrogate from a replica or a client) is written with JSON escapes rather than
    failing the answer."""
    try:
        return orjson.dumps({"error": message})
    except orjson.JSONEncodeError:
        return json.dumps({"error": message}).encode()


# --- classify and regress -------------------------------------------------------------------

_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def _feature_values(name: str, content: Any) -> tuple[str | None, list[Any]]:
    """A JSON feature (a value or a list) as (Feature kind, values) (AddValueToFeature)."""
    kind: str | None = None
    values: list[Any] = []
    item: int | float | bytes
    for value in content if isinstance(content, list) else [content]:
        if value is None or isinstance(value, list) or (
            isinstance(value, dict) and not _is_b64(value)
        ):
            raise invalid(
                f"Feature: {name} has element with unexpected JSON type: {_type_text(value)}"
            )
        if isinstance(value, bool):
            this, item = "int64_list", int(value)
        elif isinstance(value, dict):
            this, item = "bytes_list", _b64decode(value)
        elif isinstance(value, str):
            this, item = "bytes_list", value.encode("utf-8", "surrogatepass")
        elif isinstance(value, int) and _JSON_INT_MIN <= value <= _JSON_INT_MAX:
            if value > 2**63 - 1:
                raise invalid(f"Feature: {name} has uint64 element. Only int64 is supported.")
            this, item = "int64_list", value
        else:  # a double (rapidjson reads integers beyond 64 bits as doubles too)
            number = float(value)
            if math.isfinite(number) and abs(number) > _FLOAT_MAX[dtypes.DT_FLOAT]:
                raise _lossy(value, "float")
            this, item = "float_list", number
        if kind is not None and kind != this:
            raise invalid(
                f"Unexpected element type in feature: {name} expecting type: {_KIND_NAMES[kind]}"
            )
        kind = this
        values.append(item)
    return kind, values


def _example(value: Any, example: example_pb2.Example) -> None:
    if not isinstance(value, dict):
        raise invalid(f"Example must be JSON object but got JSON {_type_text(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        kind, values = _feature_values(name, content)
        if kind is not None:
            getattr(feature, kind).value.extend(values)


def fill_inference_request(
    doc: JsonDoc,
    request: inference_pb2.ClassificationRequest | inference_pb2.RegressionRequest,
) -> None:
    """`context` and `examples` of a classify/regress body into `request.input`
    (FillClassifyRegressRequestFromJson); the caller sets model_spec."""
    value = doc.value
    has_context = "context" in value
    if has_context:
        _example(value["context"], request.input.example_list_with_context.context)
    examples = value.get("examples")
    if "examples" not in value:
        raise invalid(
            f"JSON Value: {value_text(value)} When method is classify, key 'examples' is "
            "expected and was not found"
        )
    if not isinstance(examples, list):
        raise invalid(
            f"JSON Value: {value_text(value)} Expecting 'examples' value to be an list/array"
        )
    if not examples:
        raise invalid(f"JSON Value: {value_text(value)} 'examples' value is an empty array")
    target = (
        request.input.example_list_with_context.examples
        if has_context
        else request.input.example_list.examples
    )
    for item in examples:
        _example(item, target.add())


def _float32(value: float) -> Any:
    """A float field as TFS writes it: float32's shortest form, NaN/Infinity spelled out."""
    if math.isfinite(value):
        return np.float32(value)
    return orjson.Fragment(_NON_FINITE[str(value)])


def classification_response(data: bytes) -> bytes:
    """{"results": [[[label, score], ...], ...]} (MakeJsonFromClassificationResult)."""
    response = inference_pb2.ClassificationResponse.FromString(data)
    classifications = response.result.classifications
    if not classifications:
        raise invalid("Cannot convert empty ClassificationResults to JSON")
    results = [
        [[c.label, _float32(c.score)] for c in classes.classes] for classes in classifications
    ]
    return orjson.dumps({"results": results}, option=_NUMPY)


def regression_response(data: bytes) -> bytes:
    """{"results": [value, ...]} (MakeJsonFromRegressionResult)."""
    response = inference_pb2.RegressionResponse.FromString(data)
    regressions = response.result.regressions
    if not regressions:
        raise invalid("Cannot convert empty RegressionResults to JSON")
    return orjson.dumps({"results": [_float32(r.value) for r in regressions]}, option=_NUMPY)


# --- model status and metadata --------------------------------------------------------------

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _proto_dict(message: Any) -> dict[str, Any]:
    # What TFS prints: proto field names, fields at their defaults included, int64 as strings.
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def status_response(data: bytes) -> bytes:
    """A GetModelStatusResponse as TFS's REST status JSON (error_code by name: "OK")."""
    response = get_model_status_pb2.GetModelStatusResponse.FromString(data)
    states = get_model_status_pb2.ModelVersionStatus.State
    body = {
        "model_version_status": [
            {
                "version": str(s.version),
                "state": states.Name(s.state) if s.state in states.values() else str(s.state),
                "status": {
                    "error_code": _CODE_NAMES.get(s.status.error_code, str(s.status.error_code)),
                    "error_message": s.status.error_message,
                },
            }
            for s in response.model_version_status
        ]
    }
    return orjson.dumps(body)


def metadata_response(data: bytes) -> bytes:
    """A GetModelMetadataResponse as TFS's REST metadata JSON: the model spec, and the
    SignatureDefMap unpacked from its Any."""
    response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(data)
    if "signature_def" not in response.metadata:
        raise ProxyError(
            grpc.StatusCode.INTERNAL,
            "Failed to find 'signature_def' key in the GetModelMetadataResponse metadata map.",
        )
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(signature_map):
        raise ProxyError(
            grpc.StatusCode.INTERNAL,
            "Failed to unpack 'signature_def' value in the GetModelMetadataResponse metadata map.",
        )
    body = {
        "model_spec": _proto_dict(response.model_spec),
        "metadata": {"signature_def": _proto_dict(signature_map)},
    }
    return orjson.dumps(body)
