"""codec.json_numbers: a numeric tensor's JSON text, byte for byte what orjson writes for the
numpy array (the REST answer's old path), in both cores (fixture `core` in conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchproxy.codec import dtypes

NUMPY = orjson.OPT_SERIALIZE_NUMPY
WRITTEN = {
    dtypes.DT_FLOAT: np.float32, dtypes.DT_DOUBLE: np.float64, dtypes.DT_INT32: np.int32,
    dtypes.DT_UINT8: np.uint8, dtypes.DT_INT16: np.int16, dtypes.DT_INT8: np.int8,
    dtypes.DT_INT64: np.int64, dtypes.DT_BOOL: np.bool_, dtypes.DT_UINT32: np.uint32,
    dtypes.DT_UINT64: np.uint64,
}
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)


def written(core, array: np.ndarray, dtype: int) -> bytes | None:
    return core.json_numbers(dtype, tuple(array.shape), array.tobytes())


def orjson_text(array: np.ndarray) -> bytes:
    return orjson.dumps(array if array.ndim else array[()], option=NUMPY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(sorted(WRITTEN)))
def test_every_written_dtype_matches_orjson(core, data, dtype):
    kind = WRITTEN[dtype]
    elements = (st.floats(width=np.finfo(kind).bits, allow_nan=False, allow_infinity=False)
                if np.dtype(kind).kind == "f" else None)
    array = data.draw(hnp.arrays(kind, SHAPES, elements=elements))
    assert written(core, array, dtype) == orjson_text(array)


@settings(max_examples=500, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=16))
def test_float32_bit_patterns_match_orjson(core, bits):
    array = np.array(bits, dtype=np.uint32).view(np.float32)
    array = array[np.isfinite(array)]
    if array.size:
        assert written(core, array, dtypes.DT_FLOAT) == orjson_text(array)


@settings(max_examples=500, deadline=None)
@given(bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=16))
def test_float64_bit_patterns_match_orjson(core, bits):
    array = np.array(bits, dtype=np.uint64).view(np.float64)
    array = array[np.isfinite(array)]
    if array.size:
        assert written(core, array, dtypes.DT_DOUBLE) == orjson_text(array)


# Powers of two (whose shortest digits may lie above the nearest decimal: the values that
# read back as one span half as far below it), their neighbours, short dyadic fractions,
# the plain/exponent layout edges, subnormals and the extremes.
_EDGES = [2.0**e for e in range(-149, 128)] + [
    1048576.125, 1234.5625, 8388607.5, 16777216.0, 16777215.0, 0.1, 0.3, 1 / 3, 1e-45,
    1.4e-45, 3.4028235e38, 1e-5, 1e-6, 1e-7, 9.999999e-7, 1e12, 9.9999e12, 1e13, 1e14,
    123456789.0, 1.5474251e26, 1.2379401e27, 5e-324, 1e15, 1e16, 1e-4, 1.7976931348623157e308,
]


@pytest.mark.parametrize("kind", [np.float32, np.float64], ids=["float", "double"])
def test_edge_floats_match_orjson(core, kind):
    with np.errstate(over="ignore", under="ignore"):
        values = np.array(_EDGES, dtype=kind)
        values = values[np.isfinite(values)]
        every = np.concatenate([values, -values, np.nextafter(values, kind(np.inf)),
                                np.nextafter(values, kind(0))])
    every = every[np.isfinite(every)]
    dtype = dtypes.DT_FLOAT if kind is np.float32 else dtypes.DT_DOUBLE
    for value in every:  # one at a time: a mismatch names its value
        one = np.array([value], dtype=kind)
        assert written(core, one, dtype) == orjson_text(one), repr(value)


def test_nesting_follows_the_shape(core):
    array = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    assert written(core, array, dtypes.DT_INT64) == orjson_text(array)
    assert written(core, np.array(7, np.int32), dtypes.DT_INT32) == b"7"
    assert written(core, np.array([[True], [False]]), dtypes.DT_BOOL) == b"[[true],[false]]"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", [np.float32, np.float64], ids=["float", "double"])
def test_non_finite_values_are_left_to_the_caller(core, kind, value):
    dtype = dtypes.DT_FLOAT if kind is np.float32 else dtypes.DT_DOUBLE
    assert written(core, np.array([1.0, value], kind), dtype) is None


@pytest.mark.parametrize("dtype", [dtypes.DT_HALF, dtypes.DT_UINT16, dtypes.DT_BFLOAT16,
                                   dtypes.DT_COMPLEX64, dtypes.DT_STRING, 99])
def test_other_dtypes_are_left_to_the_caller(core, dtype):
    assert core.json_numbers(dtype, (2,), b"\x00" * 8) is None


def test_empty_shapes_and_wrong_sizes_are_left_to_the_caller(core):
    assert core.json_numbers(dtypes.DT_FLOAT, (2, 0), b"") is None
    assert core.json_numbers(dtypes.DT_FLOAT, (2,), b"\x00" * 4) is None
    assert core.json_numbers(dtypes.DT_FLOAT, (1,), [b"\x00" * 4]) is None


def test_shapes_past_the_payload_are_left_to_the_caller(core):
    assert core.json_numbers(dtypes.DT_FLOAT, (2**62, 2**62), b"\x00" * 8) is None
    assert core.json_numbers(dtypes.DT_FLOAT, (2**40, 0), b"") is None
    assert core.json_numbers(dtypes.DT_FLOAT, (), b"") is None
