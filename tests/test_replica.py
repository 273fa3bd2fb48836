"""The reference replica as a real process, called with a real gRPC client: TFS's answers,
encodings, status codes and messages, the demo model's accuracy, the multi model's strings,
signatures, dtypes, Classify and Regress, metrics and the cost model.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import requests
from procs import Process, start_replica

from batchproxy.codec import dtypes
from batchproxy.protos import (
    example_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    services_pb2,
    services_pb2_grpc,
    tensor_pb2,
)
from batchproxy.replica.metrics import ReplicaMetrics
from batchproxy.replica.models import demo_samples

# The replica runs the compiled core unless told otherwise; test both where both exist.
CORE_ENVS = {"python": {"BATCHPROXY_NO_EXTENSIONS": "1"}, "cython": {}}
HAVE_CYTHON = importlib.util.find_spec("batchproxy._core") is not None
BIG = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


@pytest.fixture(scope="module", params=list(CORE_ENVS))
def identity(request: pytest.FixtureRequest) -> Iterator[Process]:
    if request.param == "cython" and not HAVE_CYTHON:
        pytest.skip("compiled core not built")
    with start_replica("identity", env=CORE_ENVS[request.param]) as proc:
        yield proc


@pytest.fixture(scope="module")
def demo() -> Iterator[Process]:
    # A name and version other than the defaults, and tensor_content answers.
    with start_replica(
        "demo", model_name="mnist", model_version=3, enable_serialization_as_tensor_content=True
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def slow() -> Iterator[Process]:
    with start_replica("identity", batch_cost_ms=40, row_cost_us=1000) as proc:
        yield proc


def stub(proc: Process) -> services_pb2_grpc.PredictionServiceStub:
    return services_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(proc.address, BIG))


def model_stub(proc: Process) -> services_pb2_grpc.ModelServiceStub:
    return services_pb2_grpc.ModelServiceStub(grpc.insecure_channel(proc.address))


def request(
    array: np.ndarray | None = None,
    *,
    name: str = "identity",
    alias: str = "x",
    dtype: int = dtypes.DT_FLOAT,
    typed: bool = False,
    **spec: object,
) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            req.model_spec.version.value = value  # type: ignore[assignment]
        else:
            setattr(req.model_spec, key, value)
    if array is not None:
        tensor = req.inputs[alias]
        tensor.dtype = dtype
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        if typed:
            tensor.float_val.extend(array.ravel().tolist())
        else:
            tensor.tensor_content = array.tobytes()
    return req


def rpc_error(call, req) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(req)
    return info.value


def metric(proc: Process, line_start: str) -> float:
    text = requests.get(f"{proc.rest_url}/monitoring/prometheus/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- Predict -----------------------------------------------------------------------------


@pytest.mark.parametrize("typed_input", [False, True], ids=["tensor_content", "float_val"])
def test_identity_round_trip_answers_typed_fields(identity: Process, typed_input: bool) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    resp = stub(identity).Predict(request(x, typed=typed_input))
    y = resp.outputs["y"]
    assert list(resp.outputs) == ["y"]
    assert y.dtype == dtypes.DT_FLOAT
    assert [d.size for d in y.tensor_shape.dim] == [3, 4]
    assert y.tensor_content == b""  # TFS answers with typed fields by default
    np.testing.assert_array_equal(np.array(y.float_val, dtype=np.float32).reshape(3, 4), x)
    assert resp.model_spec.name == "identity"
    assert resp.model_spec.version.value == 1
    assert resp.model_spec.signature_name == "serving_default"


def test_identity_accepts_explicit_version_signature_and_filter(identity: Process) -> None:
    x = np.ones((2, 2), dtype=np.float32)
    req = request(x, version=1, signature_name="serving_default")
    req.output_filter.append("y")
    resp = stub(identity).Predict(req)
    assert list(resp.outputs["y"].float_val) == [1.0] * 4


def test_zero_rows(identity: Process) -> None:
    resp = stub(identity).Predict(request(np.zeros((0, 5), dtype=np.float32)))
    assert [d.size for d in resp.outputs["y"].tensor_shape.dim] == [0, 5]


def test_messages_over_4_mib(identity: Process) -> None:
    x = np.random.default_rng(1).random((2048, 1024), dtype=np.float32)  # 8 MiB
    resp = stub(identity).Predict(request(x))
    np.testing.assert_array_equal(
        np.array(resp.outputs["y"].float_val, dtype=np.float32).reshape(x.shape), x
    )


def test_demo_predictions_are_meaningful_and_tensor_content(demo: Process) -> None:
    images, labels = demo_samples(64)
    req = request(images, name="mnist", alias="flatten_input")
    resp = stub(demo).Predict(req)
    out = resp.outputs["dense_1"]
    assert not out.float_val  # started with --enable_serialization_as_tensor_content
    assert [d.size for d in out.tensor_shape.dim] == [64, 10]
    probs = np.frombuffer(out.tensor_content, dtype="<f4").reshape(64, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == labels).mean() > 0.9
    assert resp.model_spec.name == "mnist"
    assert resp.model_spec.version.value == 3


# -- errors ------------------------------------------------------------------------------

X = np.ones((2, 3), dtype=np.float32)
ERRORS = {
    "unknown model": (
        request(X, name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest(nope)",
    ),
    "unknown version": (
        request(X, version=2),
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Specific(identity, 2)",
    ),
    "version label": (
        request(X, version_label="stable"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: stable",
    ),
    "signature": (
        request(X, signature_name="x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "x" not found.',
    ),
    "dtype": (
        request(X.astype(np.float64), dtype=dtypes.DT_DOUBLE),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be float but double is provided",
    ),
    "input name": (
        request(X, alias="z"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input tensor alias not found in signature: z. Inputs expected to be in the set {x}.",
    ),
    "no inputs": (
        request(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input size does not match signature: 0!=1 len({}) != len({x}). "
        "Sent extra: {}. Missing but required: {x}.",
    ),
    "rank": (
        request(np.ones((2, 3, 4), dtype=np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Input x must have shape [-1,-1]",
    ),
    "scalar": (
        request(np.float32(1.0).reshape(())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Input x must have shape [-1,-1]",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_predict_errors(identity: Process, case: str) -> None:
    req, code, message = ERRORS[case]
    err = rpc_error(stub(identity).Predict, req)
    assert err.code() == code
    assert err.details().startswith(message)


def test_output_filter_errors(identity: Process) -> None:
    req = request(X)
    req.output_filter.append("z")
    err = rpc_error(stub(identity).Predict, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "output tensor alias not found in signature: z Outputs expected to be in the set {y}."
    )
    req.output_filter[:] = ["y", "y"]
    err = rpc_error(stub(identity).Predict, req)
    assert err.details() == "duplicate output tensor alias: y"


def test_missing_model_spec(identity: Process) -> None:
    req = request(X)
    req.ClearField("model_spec")
    err = rpc_error(stub(identity).Predict, req)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_demo_shape_checked(demo: Process) -> None:
    req = request(np.zeros((2, 28, 27), dtype=np.float32), name="mnist", alias="flatten_input")
    err = rpc_error(stub(demo).Predict, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[-1,28,28]" in err.details()


def test_unimplemented_methods(identity: Process) -> None:
    spec = {"model_spec": {"name": "identity"}}
    calls = [
        (stub(identity).Classify, inference_pb2.ClassificationRequest(**spec)),
        (stub(identity).Regress, inference_pb2.RegressionRequest(**spec)),
    ]
    for call, req in calls:
        err = rpc_error(call, req)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "reference replica" in err.details()


# -- metadata and status -----------------------------------------------------------------


def metadata_request(name: str, *fields: str) -> get_model_metadata_pb2.GetModelMetadataRequest:
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    req.model_spec.name = name
    return req


def test_metadata(demo: Process) -> None:
    resp = stub(demo).GetModelMetadata(metadata_request("mnist", "signature_def"))
    assert resp.model_spec.name == "mnist"
    assert resp.model_spec.version.value == 3
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    inp, out = sig.inputs["flatten_input"], sig.outputs["dense_1"]
    assert inp.dtype == out.dtype == dtypes.DT_FLOAT
    assert [d.size for d in inp.tensor_shape.dim] == [-1, 28, 28]
    assert [d.size for d in out.tensor_shape.dim] == [-1, 10]


@pytest.mark.parametrize(
    ("fields", "name", "code", "message"),
    [
        (
            ["signature_def"],
            "nope",
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
        (
            ["other"],
            "mnist",
            grpc.StatusCode.INVALID_ARGUMENT,
            "Metadata field other is not supported",
        ),
        (
            [],
            "mnist",
            grpc.StatusCode.INVALID_ARGUMENT,
            "GetModelMetadataRequest must specify at least one metadata_field",
        ),
    ],
)
def test_metadata_errors(
    demo: Process, fields: list[str], name: str, code: grpc.StatusCode, message: str
) -> None:
    err = rpc_error(stub(demo).GetModelMetadata, metadata_request(name, *fields))
    assert (err.code(), err.details()) == (code, message)


def status_request(name: str, version: int | None = None) -> Any:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    return req


def test_status(demo: Process) -> None:
    resp = model_stub(demo).GetModelStatus(status_request("mnist"))
    [status] = resp.model_version_status
    assert status.version == 3
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.HasField("status") and status.status.error_code == 0
    assert model_stub(demo).GetModelStatus(status_request("mnist", 3)) == resp
    for req, message in [
        (status_request("nope"), "Could not find any versions of model nope"),
        (status_request("mnist", 1), "Could not find version 1 of model mnist"),
    ]:
        err = rpc_error(model_stub(demo).GetModelStatus, req)
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, message)
    err = rpc_error(model_stub(demo).HandleReloadConfigRequest, services_pb2.ReloadConfigRequest())
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_rest_status_and_metadata(demo: Process) -> None:
    resp = requests.get(f"{demo.rest_url}/v1/models/mnist", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {
        "model_version_status": [
            {
                "version": "3",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert requests.get(f"{demo.rest_url}/V1/Models/mnist/versions/3", timeout=5).ok
    meta = requests.get(f"{demo.rest_url}/v1/models/mnist/metadata", timeout=5).json()
    assert meta["model_spec"] == {"name": "mnist", "signature_name": "", "version": "3"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["flatten_input"]["dtype"] == "DT_FLOAT"
    missing = requests.get(f"{demo.rest_url}/v1/models/nope", timeout=5)
    assert missing.status_code == 404
    assert missing.json() == {"error": "Could not find any versions of model nope"}
    bare = requests.get(f"{demo.rest_url}/v1/models", timeout=5)
    assert (bare.status_code, bare.json()) == (400, {"error": "Missing model name in request."})


# -- admin state -------------------------------------------------------------------------


def test_admin_state_makes_replica_unavailable() -> None:
    with start_replica("identity") as proc:
        admin = f"{proc.rest_url}/admin/state"
        assert requests.get(admin, timeout=5).json() == {"state": "AVAILABLE"}

        assert requests.post(admin, json={"state": "UNAVAILABLE"}, timeout=5).ok
        for call, req in [
            (stub(proc).Predict, request(X)),
            (model_stub(proc).GetModelStatus, status_request("identity")),
        ]:
            assert rpc_error(call, req).code() == grpc.StatusCode.UNAVAILABLE
        assert requests.get(f"{proc.rest_url}/v1/models/identity", timeout=5).status_code == 503

        assert requests.post(admin, json={"state": "END"}, timeout=5).ok
        [status] = model_stub(proc).GetModelStatus(status_request("identity")).model_version_status
        assert status.state == get_model_status_pb2.ModelVersionStatus.END
        assert rpc_error(stub(proc).Predict, request(X)).code() == grpc.StatusCode.NOT_FOUND

        assert requests.post(admin, json={"state": "bogus"}, timeout=5).status_code == 400
        assert requests.post(admin, json={"state": "available"}, timeout=5).ok
        assert stub(proc).Predict(request(X)).outputs["y"].float_val
        assert proc.stop() == 0  # SIGTERM stops it cleanly


# -- metrics and cost model --------------------------------------------------------------


def test_metrics_count_rows_and_codes(identity: Process) -> None:
    bucket = 'batchproxy_replica_batch_rows_bucket{le="%s"}'
    before = {le: metric(identity, bucket % le) for le in ("2.0", "4.0", "8.0")}
    ok = 'batchproxy_replica_requests_total{code="OK",method="Predict"}'
    not_found = 'batchproxy_replica_requests_total{code="NOT_FOUND",method="Predict"}'
    ok_before, nf_before = metric(identity, ok), metric(identity, not_found)
    for rows in (3, 3, 7):
        stub(identity).Predict(request(np.ones((rows, 2), dtype=np.float32)))
    rpc_error(stub(identity).Predict, request(X, name="nope"))
    after = {le: metric(identity, bucket % le) for le in before}
    assert after["2.0"] - before["2.0"] == 0
    assert after["4.0"] - before["4.0"] == 2
    assert after["8.0"] - before["8.0"] == 3
    assert metric(identity, ok) - ok_before == 3
    assert metric(identity, not_found) - nf_before == 1
    text = requests.get(f"{identity.rest_url}/metrics", timeout=5).text
    assert "batchproxy_replica_batch_rows_count" in text


def test_cost_model_takes_at_least_the_configured_time(slow: Process) -> None:
    client = stub(slow)
    client.Predict(request(X))  # connect first: only the model's time is measured below
    rows = 20  # 40 ms + 20 x 1 ms = 60 ms
    start = time.perf_counter()
    client.Predict(request(np.ones((rows, 2), dtype=np.float32)))
    assert time.perf_counter() - start >= 0.060


def test_cost_model_runs_one_predict_at_a_time(slow: Process) -> None:
    client = stub(slow)
    client.Predict(request(X))
    calls = 3  # each 40 ms + 2 x 1 ms; serialized: >= 126 ms in all
    start = time.perf_counter()
    threads = [threading.Thread(target=client.Predict, args=(request(X),)) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.perf_counter() - start >= calls * 0.042


def test_sigint_stops_cleanly() -> None:
    proc = start_replica("identity")
    proc.signal(signal.SIGINT)
    assert proc.popen.wait(10) == 0
    assert "reference replica" in proc.output()
    proc.stop()


# -- in-process use and the committed samples --------------------------------------------


async def test_replica_in_process_on_any_free_port() -> None:
    from batchproxy.replica import Replica

    replica = Replica(port=0, rest_api_port=0, host="127.0.0.1", model_kind="identity")
    await replica.start()
    try:
        assert replica.port > 0 and replica.rest_port is None  # REST port 0: off, as in TFS
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            client = services_pb2_grpc.PredictionServiceStub(channel)
            resp = await client.Predict(request(X))
        assert list(resp.outputs["y"].float_val) == [1.0] * 6
        assert replica.service.metrics.batch_rows.collect()[0].samples  # observed in-process
    finally:
        await replica.stop()


def test_committed_demo_samples_match_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    from_sklearn = demo_samples(64)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    images, labels = demo_samples(70)
    assert images.shape == (70, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images[:64], from_sklearn[0])
    np.testing.assert_array_equal(labels[:64], from_sklearn[1])
    np.testing.assert_array_equal(labels[64:], labels[:6])  # repeated past 64


# -- the multi model: strings, several outputs and signatures, Classify and Regress -------

# TensorProto's typed field for each dtype the multi model takes.
VALUE_FIELDS = {
    dtypes.DT_STRING: "string_val",
    dtypes.DT_FLOAT: "float_val",
    dtypes.DT_DOUBLE: "double_val",
    dtypes.DT_INT32: "int_val",
    dtypes.DT_INT64: "int64_val",
    dtypes.DT_BOOL: "bool_val",
    dtypes.DT_UINT64: "uint64_val",
}


@pytest.fixture(scope="module", params=list(CORE_ENVS))
def multi(request: pytest.FixtureRequest) -> Iterator[Process]:
    if request.param == "cython" and not HAVE_CYTHON:
        pytest.skip("compiled core not built")
    with start_replica("multi", model_version=3, env=CORE_ENVS[request.param]) as proc:
        yield proc


def tensor(dtype: int, values: list[Any], shape: tuple[int, ...] | None = None) -> Any:
    """A TensorProto in typed-field form, built with protobuf alone (not the core under
    test)."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in (len(values),) if shape is None else shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, VALUE_FIELDS[dtype]).extend(values)
    return proto


def multi_request(signature: str = "", **inputs: Any) -> predict_pb2.PredictRequest:
    req = request(name="multi", signature_name=signature)
    for alias, proto in inputs.items():
        req.inputs[alias].CopyFrom(proto)
    return req


def values(proto: Any) -> tuple[int, list[int], list[Any]]:
    """(dtype, shape, values) of an answer in typed-field form."""
    return (proto.dtype, [d.size for d in proto.tensor_shape.dim],
            list(getattr(proto, VALUE_FIELDS[proto.dtype])))


def test_multi_serving_default_strings_and_several_outputs(multi: Process) -> None:
    text = tensor(dtypes.DT_STRING, [b"\xff\x00hi", b"abc"])
    x = tensor(dtypes.DT_FLOAT, [1, 2, 3, 0.5], (2, 2))
    for signature in ("", "serving_default"):
        resp = stub(multi).Predict(multi_request(signature, text=text, x=x))
        assert sorted(resp.outputs) == ["count", "text_bytes", "upper", "x2"]
        out = {alias: values(proto) for alias, proto in resp.outputs.items()}
        assert out["text_bytes"] == (dtypes.DT_STRING, [2], [b"\xff\x00hi", b"abc"])
        assert out["upper"] == (dtypes.DT_STRING, [2], [b"\xff\x00HI", b"ABC"])
        assert out["count"] == (dtypes.DT_INT64, [2], [4, 3])
        assert out["x2"] == (dtypes.DT_FLOAT, [2, 2], [2.0, 4.0, 6.0, 1.0])
        assert resp.model_spec.name == "multi"
        assert resp.model_spec.version.value == 3
        assert resp.model_spec.signature_name == "serving_default"


def test_multi_signature_name_selects_the_signature(multi: Process) -> None:
    req = multi_request("lengths", text=tensor(dtypes.DT_STRING, [b"a", b"\x00\x00\x00"]))
    req.model_spec.version.value = 3
    resp = stub(multi).Predict(req)
    assert list(resp.outputs) == ["count"]
    assert values(resp.outputs["count"]) == (dtypes.DT_INT64, [2], [1, 3])
    assert resp.model_spec.signature_name == "lengths"  # the signature used is echoed
    req.output_filter.append("count")
    assert stub(multi).Predict(req).outputs["count"].int64_val == [1, 3]


def test_multi_types_signature_round_trips_each_dtype(multi: Process) -> None:
    inputs = {
        "b": tensor(dtypes.DT_BOOL, [True, False]),
        "i": tensor(dtypes.DT_INT32, [-5, 2**31 - 1]),
        "u": tensor(dtypes.DT_UINT64, [2**64 - 1, 0]),
        "d": tensor(dtypes.DT_DOUBLE, [0.1, -2.0]),
    }
    resp = stub(multi).Predict(multi_request("types", **inputs))
    assert {alias: values(proto) for alias, proto in resp.outputs.items()} == {
        alias: values(proto) for alias, proto in inputs.items()
    }


def test_multi_takes_a_scalar_string_as_one_row(multi: Process) -> None:
    req = multi_request("lengths", text=tensor(dtypes.DT_STRING, [b"abcd"], ()))
    assert values(stub(multi).Predict(req).outputs["count"]) == (dtypes.DT_INT64, [1], [4])


MULTI_ERRORS = {
    "signature": (
        multi_request("x", text=tensor(dtypes.DT_STRING, [b"a"])),
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "x" not found.',
    ),
    "dtype": (
        multi_request("", text=tensor(dtypes.DT_FLOAT, [1.0]),
                      x=tensor(dtypes.DT_FLOAT, [1, 2], (1, 2))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be string but float is provided",
    ),
    "input of another signature": (
        multi_request("lengths", text=tensor(dtypes.DT_STRING, [b"a"]),
                      x=tensor(dtypes.DT_FLOAT, [1, 2], (1, 2))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input size does not match signature: 2!=1 len({text,x}) != len({text}). "
        "Sent extra: {x}. Missing but required: {}.",
    ),
    "output of another signature": (
        multi_request("types", b=tensor(dtypes.DT_BOOL, [True]),
                      i=tensor(dtypes.DT_INT32, [1]), u=tensor(dtypes.DT_UINT64, [1]),
                      d=tensor(dtypes.DT_DOUBLE, [1.0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "output tensor alias not found in signature: count Outputs expected to be in the "
        "set {b,d,i,u}.",
    ),
}
MULTI_ERRORS["output of another signature"][0].output_filter.append("count")


@pytest.mark.parametrize("case", list(MULTI_ERRORS))
def test_multi_predict_errors(multi: Process, case: str) -> None:
    req, code, message = MULTI_ERRORS[case]
    err = rpc_error(stub(multi).Predict, req)
    assert (err.code(), err.details()) == (code, message)


def test_multi_metadata_lists_every_signature(multi: Process) -> None:
    resp = stub(multi).GetModelMetadata(metadata_request("multi", "signature_def"))
    assert (resp.model_spec.name, resp.model_spec.version.value) == ("multi", 3)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sig_map)

    def specs(side: Any) -> dict[str, tuple[int, list[int]]]:
        return {alias: (info.dtype, [d.size for d in info.tensor_shape.dim])
                for alias, info in side.items()}

    sigs = sig_map.signature_def
    assert sorted(sigs) == ["lengths", "serving_default", "types"]
    string, vector = dtypes.DT_STRING, [-1]
    assert specs(sigs["serving_default"].inputs) == {
        "text": (string, vector), "x": (dtypes.DT_FLOAT, [-1, 2])}
    assert specs(sigs["serving_default"].outputs) == {
        "text_bytes": (string, vector), "upper": (string, vector),
        "x2": (dtypes.DT_FLOAT, [-1, 2]), "count": (dtypes.DT_INT64, vector)}
    assert specs(sigs["lengths"].inputs) == {"text": (string, vector)}
    assert specs(sigs["lengths"].outputs) == {"count": (dtypes.DT_INT64, vector)}
    types = {"b": (dtypes.DT_BOOL, vector), "i": (dtypes.DT_INT32, vector),
             "u": (dtypes.DT_UINT64, vector), "d": (dtypes.DT_DOUBLE, vector)}
    assert specs(sigs["types"].inputs) == specs(sigs["types"].outputs) == types
    assert {sig.method_name for sig in sigs.values()} == {"tensorflow/serving/predict"}


def example(**features: float) -> example_pb2.Example:
    ex = example_pb2.Example()
    for name, value in features.items():
        ex.features.feature[name].float_list.value.append(value)
    return ex


def test_multi_classify(multi: Process) -> None:
    req = inference_pb2.ClassificationRequest()
    req.model_spec.name = "multi"
    tagged = example(p=0.5)
    tagged.features.feature["tag"].bytes_list.value.append(b"x")
    req.input.example_list.examples.extend([example(p=0.25), tagged, example()])
    resp = stub(multi).Classify(req)
    assert [[(c.label, c.score) for c in result.classes]
            for result in resp.result.classifications] == [
        [("ex0", 0.25)], [("ex1", 0.5)], [("ex2", 0.0)]]
    assert (resp.model_spec.name, resp.model_spec.version.value,
            resp.model_spec.signature_name) == ("multi", 3, "serving_default")


def test_multi_regress_with_and_without_context(multi: Process) -> None:
    req = inference_pb2.RegressionRequest()
    req.model_spec.name = "multi"
    req.model_spec.version.value = 3
    holder = req.input.example_list_with_context
    holder.examples.extend([example(x=0.25), example(x=2.0)])
    holder.context.CopyFrom(example(bias=1.5))
    assert [r.value for r in stub(multi).Regress(req).result.regressions] == [1.75, 3.5]
    req.input.example_list.examples.extend([example(x=0.25), example()])
    assert [r.value for r in stub(multi).Regress(req).result.regressions] == [0.25, 0.0]


@pytest.mark.parametrize("method", ["Classify", "Regress"])
def test_multi_classify_and_regress_errors(multi: Process, method: str) -> None:
    message = {"Classify": inference_pb2.ClassificationRequest,
               "Regress": inference_pb2.RegressionRequest}[method]
    call = getattr(stub(multi), method)

    def req(**spec: Any) -> Any:
        built = message()
        built.model_spec.name = spec.pop("name", "multi")
        for key, value in spec.items():
            if key == "version":
                built.model_spec.version.value = value
            else:
                setattr(built.model_spec, key, value)
        built.input.example_list.examples.append(example(p=1.0, x=1.0))
        return built

    cases = [
        (req(version=4), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Specific(multi, 4)"),
        (req(name="nope"), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        (req(signature_name="x"), grpc.StatusCode.INVALID_ARGUMENT,
         "No signature was found with the name: x"),
        (message(model_spec={"name": "multi"}), grpc.StatusCode.INVALID_ARGUMENT,
         "Input is empty."),
        (message(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
    ]
    for built, code, text in cases:
        err = rpc_error(call, built)
        assert (err.code(), err.details()) == (code, text)


def test_multi_under_tensor_content_strings_stay_string_val() -> None:
    # Numbers switch to tensor_content; the core writes strings as string_val in either mode.
    with start_replica("multi", enable_serialization_as_tensor_content=True) as proc:
        text = tensor(dtypes.DT_STRING, [b"ab", b"c"])
        x = tensor(dtypes.DT_FLOAT, [1, 2, 3, 4], (2, 2))
        resp = stub(proc).Predict(multi_request(text=text, x=x))
    upper, count = resp.outputs["upper"], resp.outputs["count"]
    assert (list(upper.string_val), upper.tensor_content) == ([b"AB", b"C"], b"")
    assert not count.int64_val
    assert np.frombuffer(count.tensor_content, dtype="<i8").tolist() == [2, 1]
    assert resp.model_spec.version.value == 1  # the default version


def test_peak_inflight_is_the_most_predicts_inside_at_once() -> None:
    metrics = ReplicaMetrics()
    for _ in range(3):
        metrics.predict_started()
    for _ in range(3):
        metrics.predict_ended()
    metrics.predict_started()
    text = metrics.render().decode()
    assert "batchproxy_replica_peak_inflight_predicts 3.0" in text
    assert "batchproxy_replica_inflight_predicts 1.0" in text
