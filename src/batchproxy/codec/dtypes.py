"""tensorflow.DataType values and their numpy equivalents, shared by the replica, the tests
and the REST layer (which types JSON by signature)."""

from __future__ import annotations

import numpy as np

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

# bfloat16 has no numpy dtype: its 16 bits travel as uint16.
NUMPY_DTYPES: dict[int, np.dtype] = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_INT32: np.dtype("<i4"),
    DT_UINT8: np.dtype("u1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT8: np.dtype("i1"),
    DT_COMPLEX64: np.dtype("<c8"),
    DT_INT64: np.dtype("<i8"),
    DT_BOOL: np.dtype("?"),
    DT_BFLOAT16: np.dtype("<u2"),
    DT_UINT16: np.dtype("<u2"),
    DT_COMPLEX128: np.dtype("<c16"),
    DT_HALF: np.dtype("<f2"),
    DT_UINT32: np.dtype("<u4"),
    DT_UINT64: np.dtype("<u8"),
}

NAMES: dict[int, str] = {
    DT_INVALID: "DT_INVALID",
    DT_FLOAT: "DT_FLOAT",
    DT_DOUBLE: "DT_DOUBLE",
    DT_INT32: "DT_INT32",
    DT_UINT8: "DT_UINT8",
    DT_INT16: "DT_INT16",
    DT_INT8: "DT_INT8",
    DT_STRING: "DT_STRING",
    DT_COMPLEX64: "DT_COMPLEX64",
    DT_INT64: "DT_INT64",
    DT_BOOL: "DT_BOOL",
    DT_BFLOAT16: "DT_BFLOAT16",
    DT_UINT16: "DT_UINT16",
    DT_COMPLEX128: "DT_COMPLEX128",
    DT_HALF: "DT_HALF",
    DT_UINT32: "DT_UINT32",
    DT_UINT64: "DT_UINT64",
}


def to_numpy(dtype: int, shape: tuple[int, ...], data: bytes | list[bytes]) -> np.ndarray:
    """A read-only array over a normalized core Tensor payload."""
    if dtype == DT_STRING:
        arr = np.empty(len(data), dtype=object)
        arr[:] = data
        return arr.reshape(shape)
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)

# TensorFlow's DataTypeString names ("float", "int32", ...), which TF and TFS use verbatim in
# their error messages.
TF_NAMES: dict[int, str] = {
    DT_FLOAT: "float",
    DT_DOUBLE: "double",
    DT_INT32: "int32",
    DT_UINT8: "uint8",
    DT_INT16: "int16",
    DT_INT8: "int8",
    DT_STRING: "string",
    DT_COMPLEX64: "complex64",
    DT_INT64: "int64",
    DT_BOOL: "bool",
    DT_BFLOAT16: "bfloat16",
    DT_UINT16: "uint16",
    DT_COMPLEX128: "complex128",
    DT_HALF: "half",
    DT_UINT32: "uint32",
    DT_UINT64: "uint64",
}


def tf_name(dtype: int) -> str:
    return TF_NAMES.get(dtype, f"type {dtype}")
