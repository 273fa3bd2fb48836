"""rest_json.predict_response: answers the codec writes (small numeric outputs) are the bytes
the numpy and orjson path writes."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchproxy.codec import dtypes
from batchproxy.frontends import rest_json
from batchproxy.frontends.rest_json import COLUMNAR, ROW, JsonTensor

KINDS = {
    dtypes.DT_FLOAT: np.float32, dtypes.DT_DOUBLE: np.float64, dtypes.DT_INT32: np.int32,
    dtypes.DT_INT64: np.int64, dtypes.DT_INT8: np.int8, dtypes.DT_UINT8: np.uint8,
    dtypes.DT_UINT64: np.uint64, dtypes.DT_BOOL: np.bool_,
}


@contextmanager
def direct_values(limit: int):
    """predict_response with the codec's writer for outputs of up to `limit` values (-1:
    off, every output through numpy), whichever core is in use."""
    saved = rest_json.DIRECT_VALUES
    rest_json.DIRECT_VALUES = limit
    try:
        yield
    finally:
        rest_json.DIRECT_VALUES = saved


LIMIT = 16  # the compiled core's setting; the tests hold for either core's writer


@st.composite
def outputs(draw) -> tuple[dict[str, JsonTensor], str]:
    fmt = draw(st.sampled_from([ROW, COLUMNAR]))
    count = 1 if fmt == ROW else draw(st.integers(1, 3))
    rows = draw(st.integers(1, 4))
    tensors = {}
    for index in range(count):
        dtype = draw(st.sampled_from(sorted(KINDS)))
        inner = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=2))
        shape = (rows, *inner) if fmt == ROW or draw(st.booleans()) else inner
        array = draw(hnp.arrays(KINDS[dtype], shape, elements=(
            st.floats(width=np.finfo(KINDS[dtype]).bits, allow_nan=False,
                      allow_infinity=False) if np.dtype(KINDS[dtype]).kind == "f" else None)))
        name = draw(st.sampled_from(["y", "scores", 'q"\\u', "é"])) + str(index)
        tensors[name] = JsonTensor(dtype, shape, array.tobytes())
    return tensors, fmt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=outputs())
def test_the_codec_writes_what_numpy_and_orjson_write(case):
    tensors, fmt = case
    with direct_values(LIMIT):
        assert rest_json._direct_response(tensors, fmt) is not None  # the path under test
        direct = rest_json.predict_response(tensors, fmt)
    with direct_values(-1):
        assert rest_json._direct_response(tensors, fmt) is None
        assert direct == rest_json.predict_response(tensors, fmt)


def test_what_the_codec_does_not_write_takes_the_numpy_path():
    one = JsonTensor(dtypes.DT_FLOAT, (1,), np.float32(1).tobytes())
    nan = JsonTensor(dtypes.DT_FLOAT, (1,), np.float32("nan").tobytes())
    big = JsonTensor(dtypes.DT_FLOAT, (LIMIT + 1,), np.ones(LIMIT + 1, np.float32).tobytes())
    half = JsonTensor(dtypes.DT_HALF, (1,), np.float16(1).tobytes())
    with direct_values(LIMIT):
        assert rest_json._direct_response({"a": one}, ROW) == b'{"predictions":[1.0]}'
        for tensors, fmt in [({"a": one, "b": one}, ROW), ({"a": nan}, ROW),
                             ({"a": big}, ROW), ({"a": half}, COLUMNAR),
                             ({"a": one, "b": nan}, COLUMNAR)]:
            assert rest_json._direct_response(tensors, fmt) is None
    assert rest_json.predict_response({"a": nan}, ROW) == b'{"predictions":[NaN]}'
    assert rest_json.predict_response({"a": one, "b": one}, ROW) == (
        b'{"predictions":[{"a":1.0,"b":1.0}]}')
