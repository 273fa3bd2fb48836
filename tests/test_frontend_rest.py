"""The REST frontend end to end: real replica and proxy processes on loopback, real HTTP
clients (`requests` as TFS tutorials use it, aiohttp for concurrency)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import socket
import time

import aiohttp
import grpc
import numpy as np
import pytest
import requests
from grpc_client import batch_rows_histogram, predict_request, stub, to_array
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from procs import start_replica
from proxy_procs import start_proxy

from batchproxy.errors import ProxyError
from batchproxy.frontends.rest import HTTP_STATUS, _response_outputs, http_status
from batchproxy.replica.models import demo_samples


@pytest.fixture(scope="module")
def identity_fleet():
    replica = start_replica("identity")
    proxy = start_proxy([replica], max_batch_size=32, batch_timeout_micros=2000)
    warm(proxy)
    yield proxy, replica
    proxy.stop()
    replica.stop()


@pytest.fixture(scope="module")
def demo_fleet():
    replica = start_replica("demo", model_name="default")
    proxy = start_proxy([replica])
    warm(proxy, "default", json.dumps({"instances": np.zeros((1, 28, 28)).tolist()}))
    yield proxy, replica
    proxy.stop()
    replica.stop()


@pytest.fixture(scope="module")
def multi_fleet():
    """The replica's `multi` model (strings, several outputs and signatures, classify and
    regress) as version 3, so versioned paths are tested against something other than 1."""
    replica = start_replica("multi", model_name="multi", model_version=3)
    proxy = start_proxy([replica])
    warm(proxy, "multi", json.dumps({"signature_name": "lengths", "instances": ["a"]}))
    yield proxy
    proxy.stop()
    replica.stop()


def warm(proxy, model: str = "identity", body: str = '{"instances": [[1, 2]]}') -> None:
    """Wait until the proxy answers a predict (a replica just started may not be healthy
    yet); this also fills the signature cache."""
    deadline = time.monotonic() + 15
    while True:
        response = predict(proxy, body, model=model)
        if response.status_code != 503 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return
        time.sleep(0.1)


def post(proxy, path: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(f"{proxy.rest_url}{path}", data=data, timeout=30, **kwargs)


def predict(proxy, body, model: str = "identity", **kwargs) -> requests.Response:
    return post(proxy, f"/v1/models/{model}:predict", body, **kwargs)


def grpc_predict(proxy, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with grpc.insecure_channel(proxy.address) as channel:
        response = stub(channel).Predict(predict_request(model, inputs), timeout=30)
    return {name: to_array(tensor) for name, tensor in response.outputs.items()}


def assert_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"], response.json()["error"]


# --- the classic tutorial flow -------------------------------------------------------------


def test_tutorial_flow_demo_model_matches_grpc(demo_fleet):
    proxy, _ = demo_fleet
    images, labels = demo_samples(16)
    data = json.dumps({"signature_name": "serving_default", "instances": images.tolist()})
    response = requests.post(f"{proxy.rest_url}/v1/models/default:predict", data=data,
                             timeout=30)
    assert response.status_code == 200, response.text
    predictions = np.array(response.json()["predictions"], dtype=np.float32)
    expected = grpc_predict(proxy, "default", {"flatten_input": images})["dense_1"]
    assert predictions.shape == (16, 10)
    np.testing.assert_array_equal(predictions, expected)  # float32's shortest form round-trips
    assert (predictions.argmax(axis=1) == labels).mean() >= 0.8


def test_tutorial_flow_identity_model_matches_grpc(identity_fleet):
    proxy, _ = identity_fleet
    x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    response = predict(proxy, {"signature_name": "serving_default", "instances": x.tolist()})
    assert response.status_code == 200, response.text
    predictions = np.array(response.json()["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(predictions, grpc_predict(proxy, "identity", {"x": x})["y"])
    np.testing.assert_array_equal(predictions, x)


# --- formats -------------------------------------------------------------------------------


def test_row_format_objects_keyed_by_input_name(identity_fleet):
    proxy, _ = identity_fleet
    response = predict(proxy, {"instances": [{"x": [1, 2]}, {"x": [3, 4]}]})
    assert response.json() == {"predictions": [[1.0, 2.0], [3.0, 4.0]]}


def test_columnar_format_plain_value(identity_fleet):
    proxy, _ = identity_fleet
    response = predict(proxy, {"inputs": [[1.5, 2], [3, 4]]})
    assert response.json() == {"outputs": [[1.5, 2.0], [3.0, 4.0]]}


def test_columnar_format_object(identity_fleet):
    proxy, _ = identity_fleet
    response = predict(proxy, {"inputs": {"x": [[1, 2]]}})
    assert response.json() == {"outputs": [[1.0, 2.0]]}


def test_whole_floats_are_written_with_a_point(identity_fleet):
    proxy, _ = identity_fleet
    response = predict(proxy, '{"instances": [[1, 2, 0.1]]}')
    assert response.content == b'{"predictions":[[1.0,2.0,0.1]]}'


def test_nan_and_infinity_travel_as_tfs_writes_them(identity_fleet):
    proxy, _ = identity_fleet
    response = predict(proxy, '{"instances": [[NaN, Infinity, -Infinity, 1.5]]}')
    assert response.status_code == 200, response.text
    assert response.content == b'{"predictions":[[NaN,Infinity,-Infinity,1.5]]}'
    response = predict(proxy, '{"inputs": {"x": [[NaN, -Infinity]]}}')
    assert response.content == b'{"outputs":[[NaN,-Infinity]]}'


def test_b64_strings_in_and_bytes_outputs_out_with_several_outputs(multi_fleet):
    raw = b"\xff\x00hi"
    body = {"instances": [
        {"text": {"b64": base64.b64encode(raw).decode()}, "x": [1, 2]},
        {"text": "abc", "x": [3, 0.5]},
    ]}
    response = predict(multi_fleet, body, model="multi")
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    assert first["text_bytes"] == {"b64": base64.b64encode(raw).decode()}
    assert first["count"] == 4 and first["x2"] == [2.0, 4.0]
    assert second == {"count": 3, "text_bytes": {"b64": "YWJj"}, "upper": "ABC",
                      "x2": [6.0, 1.0]}


def test_several_outputs_in_columnar_format(multi_fleet):
    body = {"inputs": {"text": ["a", "bb"], "x": [[1, 2], [3, 4]]}}
    response = predict(multi_fleet, body, model="multi")
    assert response.json() == {"outputs": {
        "count": [1, 2], "text_bytes": [{"b64": "YQ=="}, {"b64": "YmI="}],
        "upper": ["A", "BB"], "x2": [[2.0, 4.0], [6.0, 8.0]]}}


def test_signature_name_selects_the_signature(multi_fleet):
    body = {"signature_name": "lengths", "instances": ["a", {"b64": "AAAA"}]}
    assert predict(multi_fleet, body, model="multi").json() == {"predictions": [1, 3]}


def test_json_values_are_typed_by_the_signature(multi_fleet):
    body = {"signature_name": "types",
            "instances": [{"b": True, "i": -5, "u": 2**64 - 1, "d": 0.1},
                          {"b": False, "i": 7, "u": 0, "d": 2}]}
    response = predict(multi_fleet, body, model="multi")
    assert response.json() == {"predictions": [
        {"b": True, "i": -5, "u": 2**64 - 1, "d": 0.1},
        {"b": False, "i": 7, "u": 0, "d": 2.0}]}


def test_scalar_inputs_are_sent_unbatched(multi_fleet):
    body = {"signature_name": "lengths", "inputs": "abcd"}
    assert predict(multi_fleet, body, model="multi").json() == {"outputs": [4]}


def test_routes_are_case_insensitive(identity_fleet):
    proxy, _ = identity_fleet
    response = post(proxy, "/V1/Models/identity:PREDICT", {"instances": [[1]]})
    assert response.json() == {"predictions": [[1.0]]}
    assert requests.get(f"{proxy.rest_url}/v1/MODELS/identity", timeout=10).status_code == 200


def test_versions_in_the_path(identity_fleet):
    proxy, _ = identity_fleet
    response = post(proxy, "/v1/models/identity/versions/1:predict", {"instances": [[2]]})
    assert response.json() == {"predictions": [[2.0]]}


# --- errors --------------------------------------------------------------------------------

ERRORS = {
    "malformed_json": ('{"instances": [[1, 2]', 400, "JSON Parse error"),
    "empty_body": ("", 400, "JSON Parse error: The document is empty"),
    "not_an_object": ("[1, 2]", 400, "Is not object"),
    "signature_name_not_a_string": ('{"signature_name": 1, "instances": [[1]]}', 400,
                                    "'signature_name' key must be a string value."),
    "missing_instances_and_inputs": ('{"signature_name": "serving_default"}', 400,
                                     "Missing 'inputs' or 'instances' key"),
    "both_keys": ('{"instances": [[1]], "inputs": [[1]]}', 400,
                  "Not formatted correctly expecting only one of 'inputs' or 'instances' keys"),
    "lists_then_objects": ('{"instances": [[1], {"x": [1]}]}', 400,
                           "Expecting value/list but got object at item 1 of input list"),
    "objects_then_lists": ('{"instances": [{"x": [1]}, [1]]}', 400,
                           "Expecting object but got list at item 1 of input list"),
    "inconsistent_sizes": ('{"instances": [[1, 2], [1, 2, 3]]}', 400,
                           "Failed to process element: 1 of 'instances' list. Error: "
                           "INVALID_ARGUMENT: Expecting tensor size: 2 but got: 3"),
    "inconsistent_shapes": ('{"instances": [[[1, 2], [3, 4]], [1, 2, 3, 4]]}', 400,
                            "Expecting shape [2,2] but got: [4]"),
    "unknown_input_name": ('{"instances": [{"z": [1]}]}', 400,
                           "JSON object: does not have named input: z"),
    "missing_named_input": ('{"inputs": {"z": [[1]]}}', 400,
                            "Missing named input: x in 'inputs' object."),
    "wrong_value_type": ('{"instances": [["a"]]}', 400,
                         'JSON Value: "a" Type: String is not of expected type: float'),
    "b64_for_a_number": ('{"instances": [[{"b64": "AAAA"}]]}', 400,
                         "Type: Object is not of expected type: float"),
    "unknown_signature": ('{"signature_name": "nope", "instances": [[1]]}', 400,
                          'Serving signature name: "nope" not found in signature def'),
    "wrong_rank_for_the_model": ('{"instances": [1, 2]}', 400,
                                 "Input x must have shape [-1,-1]"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_predict_bodies_get_tfs_errors(identity_fleet, case):
    proxy, _ = identity_fleet
    body, status, message = ERRORS[case]
    assert_error(predict(proxy, body), status, message)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v1/models/nosuch:predict", 404, "Servable not found for request: Latest(nosuch)"),
        ("/v1/models/identity/versions/9:predict", 404,
         "Servable not found for request: Specific(identity, 9)"),
        ("/v1/models/identity/labels/canary:predict", 400,
         "Unrecognized servable version label: canary"),
        ("/v1/models/identity/versions/99999999999999999999:predict", 400,
         "Failed to convert version: 99999999999999999999 to numeric."),
        ("/v1/models/identity", 400, "Malformed request: POST /v1/models/identity"),
        ("/v1/models/identity:explain", 400, "Malformed request: POST"),
        ("/v2/models/identity:predict", 404, "Not found"),
    ],
    ids=["unknown_model", "unknown_version", "unknown_label", "version_overflow",
         "post_without_verb", "unknown_verb", "outside_v1"],
)
def test_bad_paths_get_tfs_errors(identity_fleet, path, status, message):
    proxy, _ = identity_fleet
    assert_error(post(proxy, path, {"instances": [[1]]}), status, message)


def test_get_without_a_model_name(identity_fleet):
    proxy, _ = identity_fleet
    response = requests.get(f"{proxy.rest_url}/v1/models", timeout=10)
    assert_error(response, 400, "Missing model name in request.")
    assert response.json() == {"error": "Missing model name in request."}


async def test_bad_requests_never_touch_other_callers(identity_fleet):
    proxy, _ = identity_fleet
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    bad = [body for body, _, _ in ERRORS.values()]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def good(i: int) -> None:
            rows = [[i, i + 0.5, -i]]
            async with session.post(url, data=json.dumps({"instances": rows})) as response:
                assert response.status == 200
                assert await response.json() == {"predictions": rows}

        async def refused(body: str) -> None:
            async with session.post(url, data=body) as response:
                assert response.status == 400

        await asyncio.gather(*(good(i) for i in range(60)),
                             *(refused(bad[i % len(bad)]) for i in range(60)))


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("INVALID_ARGUMENT", 400), ("FAILED_PRECONDITION", 400), ("OUT_OF_RANGE", 400),
        ("UNAUTHENTICATED", 401), ("PERMISSION_DENIED", 403), ("NOT_FOUND", 404),
        ("ALREADY_EXISTS", 409), ("ABORTED", 409), ("RESOURCE_EXHAUSTED", 429),
        ("CANCELLED", 499), ("UNIMPLEMENTED", 501), ("UNAVAILABLE", 503),
        ("DEADLINE_EXCEEDED", 504), ("INTERNAL", 500), ("UNKNOWN", 500), ("DATA_LOSS", 500),
    ],
)
def test_grpc_codes_map_to_tfs_http_statuses(code, status):
    assert http_status(getattr(grpc.StatusCode, code)) == status
    assert set(HTTP_STATUS) <= set(grpc.StatusCode)


def test_an_unavailable_replica_gives_503():
    replica = start_replica("identity")
    proxy = start_proxy([replica])
    try:
        requests.post(f"{replica.rest_url}/admin/state", json={"state": "UNAVAILABLE"},
                      timeout=10).raise_for_status()
        assert_error(predict(proxy, {"instances": [[1]]}), 503, "")
    finally:
        proxy.stop()
        replica.stop()


# --- status, metadata, classify, regress ---------------------------------------------------


def test_status_and_metadata_are_tfs_json(identity_fleet):
    proxy, replica = identity_fleet
    for path in ("/v1/models/identity", "/v1/models/identity/versions/1",
                 "/v1/models/identity/metadata", "/v1/models/identity/versions/1/metadata"):
        ours = requests.get(f"{proxy.rest_url}{path}", timeout=10)
        theirs = requests.get(f"{replica.rest_url}{path}", timeout=10)
        assert ours.status_code == 200, ours.text
        assert ours.headers["Content-Type"] == "application/json"
        assert ours.json() == theirs.json()
    status = requests.get(f"{proxy.rest_url}/v1/models/identity", timeout=10).json()
    assert status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]}
    assert_error(requests.get(f"{proxy.rest_url}/v1/models/nosuch/metadata", timeout=10),
                 404, "Servable not found for request: Latest(nosuch)")


@pytest.mark.parametrize("verb", ["classify", "regress"])
def test_classify_and_regress_reach_the_replica_and_keep_its_code(identity_fleet, verb):
    proxy, _ = identity_fleet
    response = post(proxy, f"/v1/models/identity:{verb}", {"examples": [{"a": 1.0}]})
    assert_error(response, 501, f"PredictionService/{verb.capitalize()} is not implemented")
    response = post(proxy, f"/v1/models/identity:{verb}", {"examples": []})
    assert_error(response, 400, "'examples' value is an empty array")


def test_classify_results(multi_fleet):
    body = {"examples": [{"p": 0.25}, {"p": 0.5, "tag": "x", "ids": [1, 2]}]}
    response = post(multi_fleet, "/v1/models/multi:classify", body)
    assert response.status_code == 200, response.text
    assert response.json() == {"results": [[["ex0", 0.25]], [["ex1", 0.5]]]}


def test_regress_results_with_context(multi_fleet):
    body = {"context": {"bias": 1.5}, "examples": [{"x": 0.25}, {"x": 2.0}]}
    response = post(multi_fleet, "/v1/models/multi/versions/3:regress", body)
    assert response.status_code == 200, response.text
    assert response.json() == {"results": [1.75, 3.5]}
    assert_error(post(multi_fleet, "/v1/models/multi/versions/4:regress", body), 404,
                 "Servable not found")


# --- transport: gzip, size limit, deadline -------------------------------------------------


def test_gzip_bodies_are_accepted(identity_fleet):
    proxy, _ = identity_fleet
    body = gzip.compress(json.dumps({"instances": [[1, 2]]}).encode())
    response = predict(proxy, body, headers={"Content-Encoding": "gzip"})
    assert response.json() == {"predictions": [[1.0, 2.0]]}
    response = predict(proxy, b"not gzip", headers={"Content-Encoding": "gzip"})
    assert_error(response, 400, "Could not decompress the gzip request body")


def test_bodies_beyond_the_limit_get_413(identity_fleet):
    _, replica = identity_fleet
    proxy = start_proxy([replica], rest_max_body_bytes=4096)
    try:
        warm(proxy)
        small = json.dumps({"instances": [[1.0] * 100]})
        assert predict(proxy, small).status_code == 200
        big = json.dumps({"instances": [[1.0] * 2000]})
        assert_error(predict(proxy, big), 413, "exceeds the limit of 4096 bytes")
        # A chunked body has no length to check first: refused once read, whole or not.
        for chunks in ([big.encode()], [big[:3000].encode(), big[3000:].encode()]):
            response = requests.post(f"{proxy.rest_url}/v1/models/identity:predict",
                                     data=iter(chunks), timeout=30)
            assert response.request.headers.get("Transfer-Encoding") == "chunked"
            assert_error(response, 413, "exceeds the limit of 4096 bytes")
        # A small gzip body that inflates past the limit is refused while inflating.
        bomb = gzip.compress(b'{"instances": [[1]]' + b" " * 2_000_000 + b"}")
        assert len(bomb) < 4096
        response = predict(proxy, bomb, headers={"Content-Encoding": "gzip"})
        assert_error(response, 413, "after gzip decompression")
        assert predict(proxy, small).status_code == 200  # and the proxy still serves
    finally:
        proxy.stop()


async def test_the_deadline_header_works_like_a_grpc_deadline():
    replica = start_replica("identity", batch_cost_ms=300)
    proxy = start_proxy([replica], max_inflight_per_replica=1)
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    body = json.dumps({"instances": [[1, 2]]})
    try:
        warm(proxy)
        async with (
            aiohttp.ClientSession() as session,
            grpc.aio.insecure_channel(proxy.address) as channel,
        ):

            async def rest(timeout_ms: str | None) -> tuple[int, dict]:
                headers = {} if timeout_ms is None else {"X-Request-Timeout-Ms": timeout_ms}
                async with session.post(url, data=body, headers=headers) as response:
                    return response.status, await response.json()

            async def grpc_call(timeout_s: float) -> grpc.StatusCode:
                request = predict_request("identity", {"x": np.array([[1, 2]], np.float32)})
                try:
                    await stub(channel).Predict(request, timeout=timeout_s)
                except grpc.aio.AioRpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            # The first call holds the only replica slot for 300 ms. Calls behind it with
            # 100 ms left cannot make it: the REST one must fare as the gRPC one does
            # (refused at once, or dropped from the queue when its deadline passes).
            first = asyncio.ensure_future(rest(None))
            await asyncio.sleep(0.05)
            (status, answer), code, patient = await asyncio.gather(
                rest("100"), grpc_call(0.1), rest("5000"))
            assert (await first)[0] == 200
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert (status, set(answer)) == (http_status(code), {"error"}), answer
        assert patient == (200, {"predictions": [[1.0, 2.0]]})
        # A deadline already passed never reaches the queue.
        assert_error(predict(proxy, body, headers={"X-Request-Timeout-Ms": "0"}), 504,
                     "Deadline Exceeded")
        assert_error(predict(proxy, body, headers={"X-Request-Timeout-Ms": "soon"}), 400,
                     "Invalid X-Request-Timeout-Ms header")
    finally:
        proxy.stop()
        replica.stop()


async def test_a_client_that_hangs_up_leaves_the_queue():
    replica = start_replica("identity", batch_cost_ms=300)
    # No warm-up: its batches (one per batch size, once the model is seen) would reach the
    # replica during the window whose rows the test counts.
    proxy = start_proxy([replica], max_inflight_per_replica=1, no_warmup=True)
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    try:
        warm(proxy)
        before = batch_rows_histogram(replica.rest_url)
        async with aiohttp.ClientSession() as session:
            blocker = asyncio.ensure_future(session.post(url, data='{"instances": [[1]]}'))
            await asyncio.sleep(0.05)
            # Queued behind the blocker with 5 rows; the client gives up after 100 ms.
            with pytest.raises(TimeoutError):
                await session.post(url, data=json.dumps({"instances": [[2]] * 5}),
                                   timeout=aiohttp.ClientTimeout(total=0.1))
            assert (await blocker).status == 200
            await asyncio.sleep(0.5)  # a batch would have been sent by now
        after = batch_rows_histogram(replica.rest_url)
        assert after["sum"] - before["sum"] == 1  # only the blocker's row reached the replica
    finally:
        proxy.stop()
        replica.stop()


# --- batches shared with gRPC --------------------------------------------------------------


async def test_rest_and_grpc_callers_share_batches():
    """While a slow replica works on one batch, 100 REST and 100 gRPC one-row callers queue
    under one batch key; the next batch holds more rows than either side sent alone."""
    replica = start_replica("identity", batch_cost_ms=500)
    proxy = start_proxy([replica], max_batch_size=256, batch_timeout_micros=2000,
                        max_inflight_per_replica=1)
    callers = 100
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            grpc.aio.insecure_channel(proxy.address) as channel,
        ):
            client = stub(channel)

            async def rest(i: int) -> None:
                rows = [[i, 1, 2, 3]]
                async with session.post(url, data=json.dumps({"instances": rows})) as response:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["predictions"] == rows

            async def grpc_call(i: int) -> None:
                x = np.array([[-i, 1, 2, 3]], dtype=np.float32)
                answer = await client.Predict(predict_request("identity", {"x": x}), timeout=30)
                np.testing.assert_array_equal(to_array(answer.outputs["y"]), x)

            await asyncio.to_thread(warm, proxy)
            await rest(0)  # warm the channels
            await grpc_call(0)
            before = batch_rows_histogram(replica.rest_url)
            blocker = asyncio.ensure_future(grpc_call(1000))
            await asyncio.sleep(0.1)
            await asyncio.gather(*(rest(i) for i in range(1, callers + 1)),
                                 *(grpc_call(i) for i in range(1, callers + 1)))
            await blocker
        after = batch_rows_histogram(replica.rest_url)
        calls = after["count"] - before["count"]
        assert after["sum"] - before["sum"] == 2 * callers + 1
        assert calls < 2 * callers / 10, f"{calls} replica calls for {2 * callers} callers"
        # Batches of more than 128 rows: neither side alone had that many.
        big = (after["count"] - after["le=128"]) - (before["count"] - before["le=128"])
        assert big >= 1, (before, after)
    finally:
        proxy.stop()
        replica.stop()


# --- property: tensors survive JSON -> proxy -> replica -> JSON ----------------------------


@settings(max_examples=25, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 6)),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    columnar=st.booleans(),
)
def test_random_tensors_round_trip_in_both_formats(identity_fleet, values, columnar):
    proxy, _ = identity_fleet
    key = "inputs" if columnar else "instances"
    # json.dumps writes NaN/Infinity literals and float32 values exactly (as float64).
    response = predict(proxy, json.dumps({key: values.astype(np.float64).tolist()}))
    assert response.status_code == 200, response.text
    answer = response.json()["outputs" if columnar else "predictions"]
    back = np.array(answer, dtype=np.float32)
    np.testing.assert_array_equal(back, values)
    assert np.array_equal(np.signbit(back), np.signbit(values)) or any(
        math.isnan(v) for v in values.ravel())


@pytest.mark.parametrize(
    "answer",
    [
        b"\x0a",  # a tag with no length
        b"\x0a\x05ab",  # a length past the end
        # output "y": DT_FLOAT, shape [2], 7 bytes of tensor_content
        b"\x0a\x16\x0a\x01y\x12\x11\x08\x01\x12\x04\x12\x02\x08\x02\x22\x07" + b"\x00" * 7,
    ],
    ids=["truncated", "overlong", "payload_against_shape"],
)
def test_a_malformed_replica_answer_is_internal(answer: bytes) -> None:
    """A replica that breaks the contract gets the caller a 500 that says so, not a crash
    and not a 400 (the caller sent nothing wrong)."""
    with pytest.raises(ProxyError) as raised:
        _response_outputs(answer)
    assert raised.value.code == grpc.StatusCode.INTERNAL
    assert http_status(raised.value.code) == 500
    assert raised.value.message.startswith("Could not read the replica's PredictResponse: ")
    if answer.endswith(b"\x00" * 7):
        assert raised.value.message.endswith("output y: tensor_content of 7 bytes for 2 elements")


# --- Expect and the routes beside the TFS API ----------------------------------------------


def _raw_exchange(proxy, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """(what came before the body was sent, what came after) on one raw connection; the
    second read ends when the answer's Content-Length is in."""
    with socket.create_connection(("127.0.0.1", proxy.rest_port), timeout=10) as sock:
        sock.sendall(head)
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = sock.recv(4096)
            if not chunk:
                return first, b""
            first += chunk
        if not first.startswith(b"HTTP/1.1 100 "):
            return first, b""
        sock.sendall(body)
        rest = first.split(b"\r\n\r\n", 1)[1]
        while b"\r\n\r\n" not in rest or len(rest.split(b"\r\n\r\n", 1)[1]) < int(
                rest.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
        return first, rest


def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent(identity_fleet):
    proxy, _ = identity_fleet
    body = b'{"instances": [[1, 2]]}'
    head = (b"POST /v1/models/identity:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    interim, answer = _raw_exchange(proxy, head, body)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"predictions": [[1.0, 2.0]]}


def test_an_unknown_expectation_is_refused_with_417(identity_fleet):
    proxy, _ = identity_fleet
    head = (b"POST /v1/models/identity:predict HTTP/1.1\r\nHost: x\r\n"
            b"Expect: teapot\r\nContent-Length: 2\r\n\r\n")
    answer, _ = _raw_exchange(proxy, head, b"{}")
    assert answer.startswith(b"HTTP/1.1 417 "), answer[:200]
    # HTTP/1.0 has no Expect: the header is ignored and the call answered.
    body = b'{"instances": [[1, 2]]}'
    with socket.create_connection(("127.0.0.1", proxy.rest_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/models/identity:predict HTTP/1.0\r\nExpect: teapot\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := sock.recv(4096):  # HTTP/1.0: the proxy closes after the answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:200]


def test_the_extra_routes_answer_get_and_head_and_nothing_else(identity_fleet):
    proxy, _ = identity_fleet
    for path in ("/metrics", "/monitoring/prometheus/metrics", "/healthz",
                 "/v1/batchproxy/replicas"):
        assert requests.get(f"{proxy.rest_url}{path}", timeout=10).status_code == 200, path
        assert requests.head(f"{proxy.rest_url}{path}", timeout=10).status_code == 200, path
    # Other methods on those paths are the TFS API's, which has no such path.
    response = requests.post(f"{proxy.rest_url}/metrics", data=b"{}", timeout=10)
    assert response.status_code == 404
    assert "error" in response.json()
    # Routes match exactly, as they did under aiohttp's router.
    assert requests.get(f"{proxy.rest_url}/METRICS", timeout=10).status_code == 404
