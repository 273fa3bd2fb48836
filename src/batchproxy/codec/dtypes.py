"""The one table of tensorflow.DataType facts: names, element sizes, which dtypes batch, the
typed TensorProto field each travels in, and its element layout.

Both codec cores build their lookups from it at import time (`_core.pyx` fills its C arrays
from these rows), and the replica, the tests and the REST layer (which types JSON by
signature) read it too. Pure Python: it imports nothing of ours, so the compiled core can
import it while it initializes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- TensorProto's typed value fields -------------------------------------------------------

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_BYTES = 2
WIRE_FIXED32 = 5


@dataclass(frozen=True)
class ValueField:
    """One typed TensorProto field (`float_val`, `int_val`, ...)."""

    name: str
    number: int  # field number in tensorflow.TensorProto
    wire: int  # wire type of one element (packed fields repeat it inside one record)
    values: str  # numpy dtype of the values protobuf hands back ("" for string_val)
    component_bytes: int = 0  # fixed-width fields: bytes per component
    per_element: int = 1  # components per element (2 for the complex fields)


VALUE_FIELDS: tuple[ValueField, ...] = (
    ValueField("float_val", 5, WIRE_FIXED32, "<f4", 4),
    ValueField("double_val", 6, WIRE_FIXED64, "<f8", 8),
    ValueField("int_val", 7, WIRE_VARINT, "<i4"),
    ValueField("string_val", 8, WIRE_BYTES, ""),
    ValueField("scomplex_val", 9, WIRE_FIXED32, "<f4", 4, 2),
    ValueField("int64_val", 10, WIRE_VARINT, "<i8"),
    ValueField("bool_val", 11, WIRE_VARINT, "?"),
    ValueField("dcomplex_val", 12, WIRE_FIXED64, "<f8", 8, 2),
    ValueField("half_val", 13, WIRE_VARINT, "<i4"),  # HALF/BFLOAT16 bits in an int32
    ValueField("uint32_val", 16, WIRE_VARINT, "<u4"),
    ValueField("uint64_val", 17, WIRE_VARINT, "<u8"),
)
FIELDS_BY_NAME: dict[str, ValueField] = {field.name: field for field in VALUE_FIELDS}

# --- DataType ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataType:
    value: int  # the tensorflow.DataType enum value
    name: str  # "DT_FLOAT"
    tf_name: str  # TF's DataTypeString ("float"): TF and TFS quote it in error messages
    # Bytes per element in tensor_content form; 0 for DT_STRING; -1: the proxy does not
    # batch it (its calls are forwarded unbatched).
    itemsize: int = -1
    field: str = ""  # the typed TensorProto field TF reads for it (tensor.cc ProtoHelper)
    # numpy dtype of one normalized element in the cores (little-endian; BOOL as one 0/1
    # byte, HALF and BFLOAT16 as their 16 raw bits); "" when not a fixed-width element.
    element: str = ""
    # numpy dtype outside the cores (the replica, REST, tests); "" when there is none.
    numpy: str = ""

    @property
    def batchable(self) -> bool:
        return self.itemsize >= 0


DATA_TYPES: tuple[DataType, ...] = (
    DataType(0, "DT_INVALID", "invalid"),
    DataType(1, "DT_FLOAT", "float", 4, "float_val", "<f4", "<f4"),
    DataType(2, "DT_DOUBLE", "double", 8, "double_val", "<f8", "<f8"),
    DataType(3, "DT_INT32", "int32", 4, "int_val", "<i4", "<i4"),
    DataType(4, "DT_UINT8", "uint8", 1, "int_val", "u1", "u1"),
    DataType(5, "DT_INT16", "int16", 2, "int_val", "<i2", "<i2"),
    DataType(6, "DT_INT8", "int8", 1, "int_val", "i1", "i1"),
    DataType(7, "DT_STRING", "string", 0, "string_val"),
    DataType(8, "DT_COMPLEX64", "complex64", 8, "scomplex_val", "<c8", "<c8"),
    DataType(9, "DT_INT64", "int64", 8, "int64_val", "<i8", "<i8"),
    DataType(10, "DT_BOOL", "bool", 1, "bool_val", "u1", "?"),
    DataType(11, "DT_QINT8", "qint8", 1, "int_val", "i1"),
    DataType(12, "DT_QUINT8", "quint8", 1, "int_val", "u1"),
    DataType(13, "DT_QINT32", "qint32", 4, "int_val", "<i4"),
    # bfloat16 has no numpy dtype: its 16 bits travel as uint16.
    DataType(14, "DT_BFLOAT16", "bfloat16", 2, "half_val", "<u2", "<u2"),
    DataType(15, "DT_QINT16", "qint16", 2, "int_val", "<i2"),
    DataType(16, "DT_QUINT16", "quint16", 2, "int_val", "<u2"),
    DataType(17, "DT_UINT16", "uint16", 2, "int_val", "<u2", "<u2"),
    DataType(18, "DT_COMPLEX128", "complex128", 16, "dcomplex_val", "<c16", "<c16"),
    DataType(19, "DT_HALF", "half", 2, "half_val", "<u2", "<f2"),
    DataType(20, "DT_RESOURCE", "resource"),
    DataType(21, "DT_VARIANT", "variant"),
    DataType(22, "DT_UINT32", "uint32", 4, "uint32_val", "<u4", "<u4"),
    DataType(23, "DT_UINT64", "uint64", 8, "uint64_val", "<u8", "<u8"),
)
# Values 24..33 (float8, int4 and int2 variants) are valid dtypes the proxy never batches;
# +100 are the _REF variants.
MAX_DTYPE = 33
REF_OFFSET = 100

BY_VALUE: dict[int, DataType] = {dt.value: dt for dt in DATA_TYPES}
assert all(dt.value == i for i, dt in enumerate(DATA_TYPES)), "rows are indexed by value"
assert all(not dt.field or dt.field in FIELDS_BY_NAME for dt in DATA_TYPES)

DT_INVALID = 0
DT_FLOAT = 1
DT_DOUBLE = 2
DT_INT32 = 3
DT_UINT8 = 4
DT_INT16 = 5
DT_INT8 = 6
DT_STRING = 7
DT_COMPLEX64 = 8
DT_INT64 = 9
DT_BOOL = 10
DT_BFLOAT16 = 14
DT_UINT16 = 17
DT_COMPLEX128 = 18
DT_HALF = 19
DT_UINT32 = 22
DT_UINT64 = 23


def valid_dtype(dtype: int) -> bool:
    """A tensorflow.DataType value: 1..33 or a _REF variant; DT_INVALID is not."""
    return 1 <= dtype <= MAX_DTYPE or REF_OFFSET + 1 <= dtype <= REF_OFFSET + MAX_DTYPE


# --- derived lookups -----------------------------------------------------------------------

NAMES: dict[int, str] = {dt.value: dt.name for dt in DATA_TYPES}
TF_NAMES: dict[int, str] = {dt.value: dt.tf_name for dt in DATA_TYPES if dt.value}
NUMPY_DTYPES: dict[int, np.dtype] = {dt.value: np.dtype(dt.numpy) for dt in DATA_TYPES
                                     if dt.numpy}


def to_numpy(dtype: int, shape: tuple[int, ...], data: bytes | list[bytes]) -> np.ndarray:
    """A read-only array over a normalized core Tensor payload."""
    if dtype == DT_STRING:
        arr = np.empty(len(data), dtype=object)
        arr[:] = data
        return arr.reshape(shape)
    assert isinstance(data, bytes)  # only DT_STRING holds a list
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)


def tf_name(dtype: int) -> str:
    return TF_NAMES.get(dtype, f"type {dtype}")
