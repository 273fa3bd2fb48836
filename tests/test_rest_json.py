"""rest_json: TFS's JSON <-> tensor rules as pure functions (no server involved)."""

from __future__ import annotations

import base64
import json
import math

import grpc
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchproxy.codec import dtypes
from batchproxy.errors import ProxyError
from batchproxy.frontends import rest_json
from batchproxy.frontends.rest_json import COLUMNAR, ROW, JsonTensor
from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    signature_pb2,
    tensor_pb2,
)

F32, F64, I32, I64, STR, BOOL = (dtypes.DT_FLOAT, dtypes.DT_DOUBLE, dtypes.DT_INT32,
                                 dtypes.DT_INT64, dtypes.DT_STRING, dtypes.DT_BOOL)


def parse(body: str | bytes, inputs: dict[str, int]) -> tuple[str, dict[str, JsonTensor]]:
    raw = body.encode() if isinstance(body, str) else body
    return rest_json.parse_predict(rest_json.loads(raw), inputs)


def refused(body: str, inputs: dict[str, int],
            code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(ProxyError) as raised:
        parse(body, inputs)
    assert raised.value.code == code
    return raised.value.message


def array(tensor: JsonTensor) -> np.ndarray:
    return dtypes.to_numpy(tensor.dtype, tensor.shape, tensor.data)


def tensor(values, dtype: int = F32) -> JsonTensor:
    arr = np.asarray(values, dtype=dtypes.NUMPY_DTYPES[dtype])
    return JsonTensor(dtype, arr.shape, arr.tobytes())


def strings(values: list[bytes], shape: tuple[int, ...] | None = None) -> JsonTensor:
    return JsonTensor(STR, shape or (len(values),), values)


# --- the body ------------------------------------------------------------------------------


def test_an_empty_body_is_refused():
    with pytest.raises(ProxyError, match="JSON Parse error: The document is empty"):
        rest_json.loads(b"")


def test_malformed_json_is_a_parse_error():
    with pytest.raises(ProxyError) as raised:
        rest_json.loads(b'{"instances": [1, 2')
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.message.startswith("JSON Parse error:")


def test_a_body_that_is_no_object_is_refused():
    with pytest.raises(ProxyError, match=r"JSON Value: \[1,2\] Is not object"):
        rest_json.loads(b"[1, 2]")


def test_nan_and_infinity_literals_are_accepted():
    doc = rest_json.loads(b'{"inputs": [NaN, Infinity, -Infinity, 1.5]}')
    values = doc.value["inputs"]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, 1.5]


def test_bool_tokens_are_noticed():
    assert rest_json.loads(b'{"inputs": [true]}').may_have_bools
    assert not rest_json.loads(b'{"inputs": [1]}').may_have_bools


def test_signature_name_must_be_a_string():
    assert rest_json.signature_name(rest_json.loads(b'{"instances": [1]}')) == ""
    assert rest_json.signature_name(rest_json.loads(b'{"signature_name": "s"}')) == "s"
    with pytest.raises(ProxyError, match="'signature_name' key must be a string value"):
        rest_json.signature_name(rest_json.loads(b'{"signature_name": 3}'))


# --- row format ----------------------------------------------------------------------------


def test_row_plain_lists_stack_into_a_batch():
    fmt, tensors = parse('{"instances": [[1, 2.5], [3, 4]]}', {"x": F32})
    assert fmt == ROW
    assert tensors["x"].shape == (2, 2)
    np.testing.assert_array_equal(array(tensors["x"]), [[1, 2.5], [3, 4]])


def test_row_scalars_give_a_vector():
    _, tensors = parse('{"instances": [1, 2, 3]}', {"x": I64})
    assert tensors["x"].shape == (3,)
    np.testing.assert_array_equal(array(tensors["x"]), [1, 2, 3])


def test_row_objects_are_keyed_by_input_name():
    body = '{"instances": [{"a": [1, 2], "b": 7}, {"a": [3, 4], "b": 8}]}'
    fmt, tensors = parse(body, {"a": F32, "b": I32})
    assert fmt == ROW
    np.testing.assert_array_equal(array(tensors["a"]), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(array(tensors["b"]), [7, 8])
    assert tensors["b"].data == np.array([7, 8], "<i4").tobytes()


def test_row_object_for_a_single_named_input():
    _, tensors = parse('{"instances": [{"x": [1, 2]}]}', {"x": F32})
    assert tensors["x"].shape == (1, 2)


def test_missing_instances_and_inputs():
    assert refused('{"signature_name": ""}', {"x": F32}) == "Missing 'inputs' or 'instances' key"


def test_both_instances_and_inputs():
    message = refused('{"instances": [1], "inputs": [1]}', {"x": F32})
    assert message.endswith(
        "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ")


def test_instances_must_be_a_non_empty_list():
    assert "Excepting 'instances' to be an list/array" in refused('{"instances": 1}', {"x": F32})
    assert "No values in 'instances' array" in refused('{"instances": []}', {"x": F32})


def test_plain_instances_need_a_single_input_signature():
    message = refused('{"instances": [[1]]}', {"a": F32, "b": F32})
    assert message == ("instances is a plain list, but expecting list of objects as multiple "
                       "input tensors required as per tensorinfo_map")


def test_lists_then_objects_are_refused():
    message = refused('{"instances": [[1], {"x": [1]}]}', {"x": F32})
    assert message == "Expecting value/list but got object at item 1 of input list"


def test_objects_then_lists_are_refused():
    message = refused('{"instances": [{"x": [1]}, [1]]}', {"x": F32})
    assert message == "Expecting object but got list at item 1 of input list"


def test_instances_of_different_sizes_are_refused():
    message = refused('{"instances": [[1, 2], [1, 2, 3]]}', {"x": F32})
    assert message == ("Failed to process element: 1 of 'instances' list. Error: "
                       "INVALID_ARGUMENT: Expecting tensor size: 2 but got: 3")


def test_instances_of_different_shapes_are_refused():
    message = refused('{"instances": [[[1, 2], [3, 4]], [1, 2, 3, 4]]}', {"x": F32})
    assert message.endswith("Expecting shape [2,2] but got: [4]")


def test_a_ragged_instance_is_refused():
    message = refused('{"instances": [[[1, 2], [3]]]}', {"x": F32})
    assert message.endswith(
        "Encountered list at unexpected size: 1 at level: 1 expected size: 2")


def test_values_at_the_wrong_depth_are_refused():
    message = refused('{"instances": [[[1, 2], 3]]}', {"x": F32})
    assert "found at incorrect level: 2 in the JSON DOM. Expected at level: 2" in message
    message = refused('{"instances": [[1, [2]]]}', {"x": F32})
    assert "Encountered list at unexpected level: 1 expected < 1" in message


def test_an_unknown_input_name_is_refused():
    message = refused('{"instances": [{"x": [1], "z": [2]}]}', {"x": F32})
    assert message == ("Failed to process element: 0 key: z of 'instances' list. Error: "
                       "INVALID_ARGUMENT: JSON object: does not have named input: z")


def test_a_missing_input_name_is_refused():
    message = refused('{"instances": [{"a": 1}]}', {"a": F32, "b": F32})
    assert message == ("Failed to process element: 0 of 'instances' list. JSON object: "
                       '{"a":1} keys must be equal to: a,b')


# --- columnar format -----------------------------------------------------------------------


def test_columnar_plain_value_for_a_single_input():
    fmt, tensors = parse('{"inputs": [[1, 2], [3, 4]]}', {"x": F32})
    assert fmt == COLUMNAR
    np.testing.assert_array_equal(array(tensors["x"]), [[1, 2], [3, 4]])


def test_columnar_scalar():
    _, tensors = parse('{"inputs": 5}', {"x": F32})
    assert tensors["x"].shape == ()
    np.testing.assert_array_equal(array(tensors["x"]), 5)


def test_columnar_object_keyed_by_input_name():
    fmt, tensors = parse('{"inputs": {"a": [1, 2], "b": [[1], [2], [3]], "extra": 1}}',
                         {"a": F32, "b": I64})
    assert fmt == COLUMNAR
    assert set(tensors) == {"a", "b"}  # keys outside the signature are ignored, as in TFS
    assert tensors["b"].shape == (3, 1)


def test_columnar_missing_named_input():
    message = refused('{"inputs": {"a": [1]}}', {"a": F32, "b": F32})
    assert message == "Missing named input: b in 'inputs' object."


def test_columnar_plain_value_for_several_inputs():
    message = refused('{"inputs": [1]}', {"a": F32, "b": F32})
    assert message.startswith("inputs is a plain value/list, but expecting an object")


def test_an_empty_signature_is_refused():
    message = rest_json_refusal('{"inputs": [1]}', {}, "sig")
    assert message == "Failed to get input map for signature: sig"


def rest_json_refusal(body: str, inputs: dict[str, int], signature: str) -> str:
    with pytest.raises(ProxyError) as raised:
        rest_json.parse_predict(rest_json.loads(body.encode()), inputs, signature)
    return raised.value.message


# --- values and dtypes ---------------------------------------------------------------------


def test_b64_objects_become_bytes_for_strings():
    payload = base64.b64encode(b"\x00\xffbin").decode()
    body = json.dumps({"instances": [{"b64": payload}, "plain", {"b64": payload.rstrip("=")}]})
    _, tensors = parse(body, {"s": STR})
    assert tensors["s"] == JsonTensor(STR, (3,), [b"\x00\xffbin", b"plain", b"\x00\xffbin"])


def test_b64_in_columnar_and_named_row_format():
    payload = base64.b64encode(b"abc").decode()
    _, tensors = parse(json.dumps({"inputs": {"b64": payload}}), {"s": STR})
    assert tensors["s"] == JsonTensor(STR, (), [b"abc"])
    body = json.dumps({"instances": [{"s": {"b64": payload}, "n": 1}]})
    _, tensors = parse(body, {"s": STR, "n": I64})
    assert tensors["s"] == JsonTensor(STR, (1,), [b"abc"])


def test_b64_is_refused_for_numbers():
    message = refused('{"inputs": [{"b64": "AAAA"}]}', {"x": F32})
    assert message == 'JSON Value: {"b64":"AAAA"} Type: Object is not of expected type: float'


def test_bad_base64_is_refused():
    assert refused('{"inputs": [{"b64": "***"}]}', {"s": STR}) == "Unable to base64 decode"


def test_an_object_that_is_no_b64_object_is_refused_for_strings():
    message = refused('{"inputs": [{"b64": "AA", "x": 1}]}', {"s": STR})
    assert message.endswith("not formatted correctly for base64 data")


def test_nan_and_infinity_become_floats():
    _, tensors = parse('{"instances": [[NaN, Infinity, -Infinity, 0.5]]}', {"x": F32})
    values = array(tensors["x"])[0]
    assert math.isnan(values[0]) and list(values[1:]) == [math.inf, -math.inf, 0.5]


@pytest.mark.parametrize(
    ("body", "dtype", "message"),
    [
        ('{"inputs": [1.5]}', I32, "JSON Value: 1.5 Type: Number is not of expected type: int32"),
        ('{"inputs": [true]}', F32, "JSON Value: true Type: True is not of expected type: float"),
        ('{"inputs": [1, true]}', I64, "Type: True is not of expected type: int64"),
        ('{"inputs": [1]}', BOOL, "JSON Value: 1 Type: Number is not of expected type: bool"),
        ('{"inputs": ["a"]}', F32, 'JSON Value: "a" Type: String is not of expected type: float'),
        ('{"inputs": [null]}', F32, "JSON Value: null Type: Null is not of expected type: float"),
        ('{"inputs": [3000000000]}', I32, "Type: Number is not of expected type: int32"),
        ('{"inputs": [-1]}', dtypes.DT_UINT32, "is not of expected type: uint32"),
        ('{"inputs": [16777217]}', F32,
         "Cannot convert JSON value: 16777217 to float without loss of precision."),
        ('{"inputs": [1e39]}', F32,
         "Cannot convert JSON value: 1e+39 to float without loss of precision."),
        ('{"inputs": [1]}', STR, "JSON Value: 1 Type: Number is not of expected type: string"),
    ],
)
def test_values_must_fit_the_signature_dtype(body, dtype, message):
    assert message in refused(body, {"x": dtype})


def test_unsupported_dtypes_are_unimplemented():
    message = refused('{"inputs": [1.5]}', {"x": dtypes.DT_HALF}, grpc.StatusCode.UNIMPLEMENTED)
    assert message == "Conversion of JSON Value: 1.5 to type: half"
    # In the row format TFS wraps the same error in INVALID_ARGUMENT.
    message = refused('{"instances": [1.5]}', {"x": dtypes.DT_BFLOAT16})
    assert "UNIMPLEMENTED: Conversion of JSON Value: 1.5 to type: bfloat16" in message


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([1, -2], I32, np.array([1, -2], "<i4")),
        ([200, -1], dtypes.DT_UINT8, np.array([200, 255], "u1")),  # TF narrows with a cast
        ([2**63 - 1, -(2**63)], I64, np.array([2**63 - 1, -(2**63)], "<i8")),
        ([2**64 - 1, 0], dtypes.DT_UINT64, np.array([2**64 - 1, 0], "<u8")),
        ([True, False], BOOL, np.array([1, 0], "u1")),
        ([0.1, 2], F64, np.array([0.1, 2.0], "<f8")),
        ([16777215, 0.5], F32, np.array([16777215, 0.5], "<f4")),
        ([1e30, 1], F32, np.array([1e30, 1], "<f4")),
    ],
)
def test_values_become_little_endian_elements_of_the_dtype(values, dtype, expected):
    _, tensors = parse(json.dumps({"inputs": values}), {"x": dtype})
    assert tensors["x"].data == expected.tobytes()


# numpy's one-call conversion must agree with the value-by-value walk on every input.
_leaf = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_nested = st.recursive(st.lists(_leaf, max_size=4),
                       lambda inner: st.lists(inner, min_size=1, max_size=3), max_leaves=12)
_DTYPES = [F32, F64, I32, dtypes.DT_INT8, dtypes.DT_UINT8, I64, dtypes.DT_UINT32,
           dtypes.DT_UINT64, BOOL]


@settings(max_examples=300, deadline=None)
@given(value=_nested, dtype=st.sampled_from(_DTYPES))
def test_the_numpy_path_agrees_with_the_careful_walk(value, dtype):
    body = json.dumps({"inputs": value}).encode()
    doc = rest_json.loads(body)
    try:
        fast = rest_json.parse_predict(doc, {"x": dtype})[1]["x"]
    except ProxyError as err:
        fast = err.message
    value = doc.value["inputs"]  # as parsed: integers beyond 64 bits are doubles, as in TFS
    shape = rest_json._dense_shape(value)
    values: list = []
    try:
        rest_json._fill(value, 0, shape, dtype, values)
        careful = rest_json._pack(dtype, shape, values)
    except ProxyError as err:
        careful = err.message
    assert fast == careful


# Small tensors of plain numbers are packed without numpy: the same bytes as both other paths.
_I16, _I8, _U8 = dtypes.DT_INT16, dtypes.DT_INT8, dtypes.DT_UINT8
_SMALL_DTYPES = [*_DTYPES, _I16]


@pytest.mark.parametrize(
    ("value", "dtype", "shape", "expected"),
    [
        ([40000, -1], _I16, (2,), np.array([40000, -1]).astype(np.int32).astype("<i2")),
        ([[200, -129]], _I8, (1, 2), np.array([200, -129]).astype(np.int32).astype("i1")),
        ([300, -1], _U8, (2,), np.array([300, -1]).astype(np.int32).astype("u1")),
        ([-0.0, 0.1, 3], F32, (3,), np.array([-0.0, 0.1, 3.0], "<f4")),
        ([[16777215, -16777215]], F32, (1, 2), np.array([16777215, -16777215], "<f4")),
        ([2**53 - 1, 0.1], F64, (2,), np.array([2**53 - 1, 0.1], "<f8")),
        ([[[1], [2]], [[3], [4]]], I32, (2, 2, 1), np.arange(1, 5, dtype="<i4")),
        (7, I64, (), np.array(7, "<i8")),
        ([[], []], F32, (2, 0), np.zeros(0, "<f4")),
        ([], I32, (0,), np.zeros(0, "<i4")),
        ([[True], [False]], BOOL, (2, 1), np.array([1, 0], "u1")),
        ([2**32 - 1], dtypes.DT_UINT32, (1,), np.array([2**32 - 1], "<u4")),
    ],
)
def test_small_tensors_are_packed_without_numpy(value, dtype, shape, expected):
    small = rest_json._small(value, dtype)
    assert small == JsonTensor(dtype, shape, expected.tobytes())
    _, tensors = parse(json.dumps({"inputs": value}), {"x": dtype})
    assert tensors["x"] == small


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ([16777216], F32),  # beyond float32's exact integers: refused by the careful walk
        ([1e30], F32),  # accepted, but left to the other paths
        ([math.nan], F64),
        ([math.inf], F32),
        ([True], I32),
        ([1], BOOL),
        ([1.5], I32),
        ([2**31], I32),
        ([-1], dtypes.DT_UINT64),
        ([[1], [1, 2]], F32),  # ragged
        ([1, [2]], F32),
        ([{"b64": "AA=="}], F32),
        (["1"], F32),
        ([None], F32),
        ([1.0] * (rest_json.SMALL_TENSOR + 1), F32),  # not small
        ([1.5], dtypes.DT_HALF),  # TFS does not convert JSON to half
    ],
)
def test_small_path_leaves_the_rest_to_the_others(value, dtype):
    assert rest_json._small(value, dtype) is None


@settings(max_examples=300, deadline=None)
@given(value=_nested | _leaf, dtype=st.sampled_from(_SMALL_DTYPES),
       may_have_bools=st.booleans())
def test_the_small_path_agrees_with_numpy_and_the_careful_walk(value, dtype, may_have_bools):
    small = rest_json._small(value, dtype)
    if small is None:
        return
    array = rest_json._fast_numpy(value, dtype, may_have_bools)
    if array is not None:
        assert small == JsonTensor(dtype, array.shape, array.tobytes())
    shape = rest_json._dense_shape(value)
    values: list = []
    rest_json._fill(value, 0, shape, dtype, values)  # accepted: no refusal here
    assert small == rest_json._pack(dtype, shape, values)


def test_row_objects_take_the_small_path_too():
    _, tensors = parse('{"instances": [{"a": [1, 2], "b": 3}, {"a": [4, 5], "b": 6}]}',
                       {"a": _I16, "b": F32})
    assert tensors == {
        "a": JsonTensor(_I16, (2, 2), np.array([1, 2, 4, 5], "<i2").tobytes()),
        "b": JsonTensor(F32, (2,), np.array([3, 6], "<f4").tobytes()),
    }


# --- writing -------------------------------------------------------------------------------


def dumps(outputs: dict[str, JsonTensor], fmt: str) -> dict:
    return json.loads(rest_json.predict_response(outputs, fmt))


def test_row_answer_with_one_output_is_the_list_over_the_batch():
    body = rest_json.predict_response({"y": tensor([[1, 2.5], [3, 4]])}, ROW)
    assert body == b'{"predictions":[[1.0,2.5],[3.0,4.0]]}'


def test_row_answer_with_several_outputs_has_an_object_per_row():
    outputs = {"a": tensor([1, 2], I64), "b": tensor([[0.5], [1.5]])}
    assert dumps(outputs, ROW) == {"predictions": [{"a": 1, "b": [0.5]}, {"a": 2, "b": [1.5]}]}


def test_columnar_answers():
    assert dumps({"y": tensor([[1, 2]])}, COLUMNAR) == {"outputs": [[1.0, 2.0]]}
    outputs = {"a": tensor([1, 2], I64), "b": tensor(3.5)}
    assert dumps(outputs, COLUMNAR) == {"outputs": {"a": [1, 2], "b": 3.5}}


def test_float32_is_written_in_its_shortest_form_and_whole_floats_with_a_point():
    body = rest_json.predict_response({"y": tensor([0.1, 1, 1234567, 1e-7])}, COLUMNAR)
    assert body == b'{"outputs":[0.1,1.0,1234567.0,1e-7]}'


@pytest.mark.parametrize("dtype", [F32, F64, dtypes.DT_HALF])
def test_nan_and_infinity_are_written_as_tfs_writes_them(dtype):
    values = [math.nan, math.inf, -math.inf, 2]
    body = rest_json.predict_response({"y": tensor([values], dtype)}, ROW)
    assert body == b'{"predictions":[[NaN,Infinity,-Infinity,2.0]]}'
    body = rest_json.predict_response({"y": tensor(values, dtype)}, COLUMNAR)
    assert body == b'{"outputs":[NaN,Infinity,-Infinity,2.0]}'
    outputs = {"y": tensor(values, dtype), "z": tensor([1, 2, 3, 4], I64)}
    body = rest_json.predict_response(outputs, ROW)
    assert body == (b'{"predictions":[{"y":NaN,"z":1},{"y":Infinity,"z":2},'
                    b'{"y":-Infinity,"z":3},{"y":2.0,"z":4}]}')
    assert json.loads(body)["predictions"][1]["y"] == math.inf


def test_strings_are_text_and_bytes_outputs_are_b64():
    outputs = {"name": strings([b"caf\xc3\xa9", b"x"]),
               "raw_bytes": strings([b"\x00\xff", b""])}
    assert dumps(outputs, ROW) == {"predictions": [
        {"name": "café", "raw_bytes": {"b64": "AP8="}},
        {"name": "x", "raw_bytes": {"b64": ""}},
    ]}
    assert dumps({"m": strings([b"a", b"b", b"c", b"d"], (2, 2))}, COLUMNAR) == {
        "outputs": [["a", "b"], ["c", "d"]]}


def test_other_dtypes_are_written_as_json_numbers_and_booleans():
    outputs = {
        "b": tensor([True, False], BOOL),
        "u": tensor([2**64 - 1, 0], dtypes.DT_UINT64),
        "i": tensor([-(2**63), 1], I64),
        "s": tensor([-3, 4], dtypes.DT_INT8),
    }
    assert dumps(outputs, COLUMNAR) == {"outputs": {
        "b": [True, False], "u": [2**64 - 1, 0], "i": [-(2**63), 1], "s": [-3, 4]}}


def test_empty_dimensions_are_empty_lists():
    assert dumps({"y": tensor(np.zeros((2, 0)))}, ROW) == {"predictions": [[], []]}
    assert dumps({"s": strings([], (2, 0))}, COLUMNAR) == {"outputs": [[], []]}


def test_row_answer_needs_one_batch_size():
    with pytest.raises(ProxyError, match="Tensor name: b has inconsistent batch size: 3 "
                                         "expecting: 2"):
        rest_json.predict_response({"a": tensor([1, 2]), "b": tensor([1, 2, 3])}, ROW)
    with pytest.raises(ProxyError, match="Tensor name: a has no shape information"):
        rest_json.predict_response({"a": tensor(1.0)}, ROW)
    with pytest.raises(ProxyError, match="Cannot convert empty tensor map to JSON"):
        rest_json.predict_response({}, ROW)


def test_dtypes_tfs_cannot_write_are_refused():
    with pytest.raises(ProxyError, match="Failed to write JSON value for tensor type: complex64"):
        rest_json.predict_response({"c": tensor([1j], dtypes.DT_COMPLEX64)}, COLUMNAR)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    columnar=st.booleans(),
)
def test_floats_survive_json_both_ways(values, columnar):
    key = "inputs" if columnar else "instances"
    body = json.dumps({key: values.astype(np.float64).tolist()}).encode()
    fmt, tensors = rest_json.parse_predict(rest_json.loads(body), {"x": F32})
    np.testing.assert_array_equal(array(tensors["x"]), values)
    answer = json.loads(rest_json.predict_response(tensors, fmt))
    written = answer["outputs" if columnar else "predictions"]
    np.testing.assert_array_equal(np.array(written, dtype=np.float32), values)


# --- classify and regress ------------------------------------------------------------------


def classification_request(body: dict) -> inference_pb2.ClassificationRequest:
    request = inference_pb2.ClassificationRequest()
    rest_json.fill_inference_request(rest_json.loads(json.dumps(body).encode()), request)
    return request


def test_examples_become_tensorflow_examples():
    request = classification_request({"examples": [
        {"f": 1.5, "i": [1, 2], "s": "text", "b": {"b64": "AP8="}, "t": True, "e": []},
    ]})
    (example,) = request.input.example_list.examples
    feature = example.features.feature
    assert list(feature["f"].float_list.value) == [1.5]
    assert list(feature["i"].int64_list.value) == [1, 2]
    assert list(feature["s"].bytes_list.value) == [b"text"]
    assert list(feature["b"].bytes_list.value) == [b"\x00\xff"]
    assert list(feature["t"].int64_list.value) == [1]
    assert feature["e"].WhichOneof("kind") is None


def test_context_selects_the_example_list_with_context():
    request = classification_request({"context": {"c": 2}, "examples": [{"f": 1.0}]})
    assert request.input.WhichOneof("kind") == "example_list_with_context"
    holder = request.input.example_list_with_context
    assert list(holder.context.features.feature["c"].int64_list.value) == [2]
    assert len(holder.examples) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"examples": [{"f": [1, 1.5]}]}, "Unexpected element type in feature: f expecting type: "
                                          "int64"),
        ({"examples": [{"f": [None]}]}, "Feature: f has element with unexpected JSON type: Null"),
        ({"examples": [{"f": 2**63}]}, "Feature: f has uint64 element. Only int64 is supported."),
        ({"examples": [[1]]}, "Example must be JSON object but got JSON Array"),
        ({"context": {}}, "When method is classify, key 'examples' is expected and was not found"),
        ({"examples": {}}, "Expecting 'examples' value to be an list/array"),
        ({"examples": []}, "'examples' value is an empty array"),
    ],
)
def test_bad_examples_are_refused(body, message):
    with pytest.raises(ProxyError) as raised:
        classification_request(body)
    assert message in raised.value.message
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_classification_and_regression_results():
    response = inference_pb2.ClassificationResponse()
    classes = response.result.classifications.add()
    classes.classes.add(label="a", score=0.1)
    classes.classes.add(label="b", score=math.nan)
    body = rest_json.classification_response(response.SerializeToString())
    assert body == b'{"results":[[["a",0.1],["b",NaN]]]}'
    regression = inference_pb2.RegressionResponse()
    regression.result.regressions.add(value=2)
    regression.result.regressions.add(value=-math.inf)
    body = rest_json.regression_response(regression.SerializeToString())
    assert body == b'{"results":[2.0,-Infinity]}'
    with pytest.raises(ProxyError, match="Cannot convert empty ClassificationResults to JSON"):
        rest_json.classification_response(b"")
    with pytest.raises(ProxyError, match="Cannot convert empty RegressionResults to JSON"):
        rest_json.regression_response(b"")


# --- status and metadata -------------------------------------------------------------------


def test_status_json_prints_int64_as_strings_and_codes_by_name():
    response = get_model_status_pb2.GetModelStatusResponse()
    response.model_version_status.add(version=7, state=30)
    failed = response.model_version_status.add(version=6, state=50)
    failed.status.error_code = 5
    failed.status.error_message = "gone"
    assert orjson.loads(rest_json.status_response(response.SerializeToString())) == {
        "model_version_status": [
            {"version": "7", "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}},
            {"version": "6", "state": "END",
             "status": {"error_code": "NOT_FOUND", "error_message": "gone"}},
        ]
    }


def test_metadata_json_unpacks_the_signature_map():
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    sig = signature_map.signature_def["serving_default"]
    sig.method_name = "tensorflow/serving/predict"
    sig.inputs["x"].CopyFrom(signature_pb2.TensorInfo(name="x:0", dtype=F32))
    sig.inputs["x"].tensor_shape.dim.add(size=-1)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = "m"
    response.model_spec.version.value = 2
    response.metadata["signature_def"].Pack(signature_map)
    body = orjson.loads(rest_json.metadata_response(response.SerializeToString()))
    assert body["model_spec"] == {"name": "m", "version": "2", "signature_name": ""}
    x = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]
    assert x == {"name": "x:0", "dtype": "DT_FLOAT",
                 "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}}


# --- answers read by the codec ----------------------------------------------------------------


def _old_outputs(core, data: bytes) -> dict:
    """The REST answer path before the codec read answers: protobuf, then decode_tensor."""
    resp = predict_pb2.PredictResponse.FromString(data)
    return {n: core.decode_tensor(resp.outputs[n].SerializeToString())
            for n in sorted(resp.outputs)}


_WRITABLE_NUMBERS = {F32: "<f4", F64: "<f8", I32: "<i4", dtypes.DT_INT16: "<i2",
                     dtypes.DT_INT8: "i1", dtypes.DT_UINT8: "u1", I64: "<i8",
                     dtypes.DT_UINT32: "<u4", dtypes.DT_UINT64: "<u8", dtypes.DT_HALF: "<f2"}


@pytest.mark.parametrize("fmt", [ROW, COLUMNAR])
@pytest.mark.parametrize("typed", [True, False], ids=["typed", "content"])
@pytest.mark.parametrize("dtype", [*_WRITABLE_NUMBERS, BOOL, STR, dtypes.DT_BFLOAT16])
def test_answers_read_by_the_codec_write_the_same_json(core, dtype, typed, fmt):
    resp = predict_pb2.PredictResponse()
    for name in ("y", "y_bytes"):
        tp = resp.outputs[name]
        tp.dtype = dtype
        for d in (2, 2):
            tp.tensor_shape.dim.add(size=d)
        if dtype == STR:
            tp.string_val.extend([b"a", b"\xff\x00", "é".encode(), b""])
        elif dtype == BOOL:
            if typed:
                tp.bool_val.extend([True, False, False, True])
            else:
                tp.tensor_content = bytes([1, 0, 0, 1])
        elif dtype in (dtypes.DT_HALF, dtypes.DT_BFLOAT16):
            halves = np.array([0.5, -2, np.inf, np.nan], "<f2").view("<u2")
            if typed:
                tp.half_val.extend(halves.tolist())
            else:
                tp.tensor_content = halves.tobytes()
        else:
            values = np.array([1, -1, 100, 7], "<i8").astype(_WRITABLE_NUMBERS[dtype])
            if dtype in (F32, F64):
                values = np.array([0.1, -0.0, np.nan, np.inf], _WRITABLE_NUMBERS[dtype])
            if typed:
                tp.CopyFrom(tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tp.tensor_shape))
                field = {F32: "float_val", F64: "double_val", I64: "int64_val",
                         dtypes.DT_UINT32: "uint32_val", dtypes.DT_UINT64: "uint64_val"}
                getattr(tp, field.get(dtype, "int_val")).extend(values.tolist())
            else:
                tp.tensor_content = values.tobytes()
    data = resp.SerializeToString()
    outputs, _ = core.decode_predict_response(data)

    def answer(outs):
        try:
            return rest_json.predict_response(outs, fmt)
        except ProxyError as err:
            return err.code, err.message

    assert answer(outputs) == answer(_old_outputs(core, data))
    if dtype == dtypes.DT_BFLOAT16:  # TFS cannot write it; neither can the proxy
        assert answer(outputs)[0] == grpc.StatusCode.INVALID_ARGUMENT
    if dtype == STR:
        body = json.loads(answer(outputs))
        got = body["outputs"] if fmt == COLUMNAR else body["predictions"]
        rows = got["y_bytes"] if fmt == COLUMNAR else [r["y_bytes"] for r in got]
        assert rows[0][1] == {"b64": base64.b64encode(b"\xff\x00").decode()}
