"""The official TFS client (tensorflow-serving-api) against batchproxy, unchanged.

Runs in a pytest process of its own (`make test` does that), so the main suite never loads
TensorFlow; the proxy and replicas are separate processes. test_same_process.py checks that
TensorFlow and batchproxy also share one process."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import grpc  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import start_replica  # noqa: E402
from proxy_procs import start_proxy  # noqa: E402


@pytest.fixture(scope="module")
def fleets():
    """(identity proxy, identity replica, demo proxy, demo replica)."""
    identity = start_replica("identity")
    demo = start_replica("demo", model_name="mnist")
    identity_proxy = start_proxy([identity], max_batch_size=16, batch_timeout_micros=3000)
    demo_proxy = start_proxy([demo], max_batch_size=16, batch_timeout_micros=3000)
    yield identity_proxy, identity, demo_proxy, demo
    for proc in (identity_proxy, demo_proxy, identity, demo):
        proc.stop()


def predict(
    address: str, model: str, input_name: str, value: np.ndarray, *, proto=None
) -> predict_pb2.PredictResponse:
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_default"
        request.inputs[input_name].CopyFrom(
            proto if proto is not None else tf.make_tensor_proto(value)
        )
        return stub.Predict(request, timeout=20.0)


def test_identity_answers_match_a_direct_replica(fleets):
    proxy, identity, _, _ = fleets
    x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    through = predict(proxy.address, "identity", "x", x)
    direct = predict(identity.address, "identity", "x", x)
    np.testing.assert_array_equal(tf.make_ndarray(through.outputs["y"]), x)
    assert list(through.outputs["y"].float_val) == list(direct.outputs["y"].float_val)
    assert through.outputs["y"] == direct.outputs["y"]
    assert through.model_spec == direct.model_spec


def test_demo_classifier_through_the_proxy_equals_direct(fleets):
    _, _, proxy, demo = fleets
    images = np.random.default_rng(2).random((4, 28, 28)).astype(np.float32)
    through = predict(proxy.address, "mnist", "flatten_input", images)
    direct = predict(demo.address, "mnist", "flatten_input", images)
    probabilities = tf.make_ndarray(through.outputs["dense_1"])
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities, tf.make_ndarray(direct.outputs["dense_1"]))


def test_typed_float_val_requests_as_java_and_go_send_them(fleets):
    proxy, _, _, _ = fleets
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = tf.make_tensor_proto(x)
    typed = tf.make_tensor_proto([0.0])  # rebuild in float_val form
    typed.ClearField("tensor_content")
    typed.ClearField("float_val")
    typed.dtype = proto.dtype
    typed.tensor_shape.CopyFrom(proto.tensor_shape)
    typed.float_val.extend(x.ravel().tolist())
    response = predict(proxy.address, "identity", "x", x, proto=typed)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), x)


def test_concurrent_official_clients_are_batched_and_answered(fleets):
    proxy, _, _, _ = fleets
    inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda x: predict(proxy.address, "identity", "x", x), inputs))
    for x, response in zip(inputs, responses, strict=True):
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), x)


def test_metadata_through_the_proxy(fleets):
    _, _, proxy, _ = fleets
    with grpc.insecure_channel(proxy.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "mnist"
        request.metadata_field.append("signature_def")
        response = stub.GetModelMetadata(request, timeout=10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert list(signature.inputs) == ["flatten_input"]
    assert signature.outputs["dense_1"].dtype == tf.float32.as_datatype_enum
