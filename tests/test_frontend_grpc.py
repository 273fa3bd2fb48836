"""The gRPC frontend: what TFS clients see for forwarded methods and errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_client import metadata_request, predict_request, status_request, stub, to_array
from procs import start_replica
from proxy_procs import start_proxy

from batchproxy.protos import inference_pb2, predict_pb2, services_pb2_grpc, tensor_pb2


@pytest.fixture(scope="module")
def fleet():
    replica = start_replica("identity")
    proxy = start_proxy([replica])
    yield proxy, replica
    proxy.stop()
    replica.stop()


async def test_metadata_and_status_are_forwarded_unchanged(fleet):
    proxy, replica = fleet
    results = []
    for address in (proxy.address, replica.address):
        async with grpc.aio.insecure_channel(address) as channel:
            metadata = await stub(channel).GetModelMetadata(metadata_request("identity"), timeout=5)
            status = await services_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                status_request("identity"), timeout=5
            )
            results.append((metadata, status))
    assert results[0] == results[1]
    metadata, status = results[0]
    assert "signature_def" in metadata.metadata
    assert status.model_version_status[0].state == 30  # AVAILABLE


async def test_replica_errors_come_back_with_the_replicas_code_and_message(fleet):
    proxy, _ = fleet
    cases = [
        (
            predict_request("nosuchmodel", {"x": np.ones((1, 2))}),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nosuchmodel)",
        ),
        (
            predict_request("identity", {"x": np.ones((1, 2))}, signature="nope"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
    ]
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for request, code, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub(channel).Predict(request, timeout=5)
            assert raised.value.code() == code
            assert raised.value.details() == message


async def test_wrong_dtype_fails_only_its_caller(fleet):
    proxy, _ = fleet
    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "identity"
    bad.inputs["x"].dtype = tensor_pb2.DT_INT32
    bad.inputs["x"].tensor_shape.dim.add(size=1)
    bad.inputs["x"].tensor_shape.dim.add(size=2)
    bad.inputs["x"].int_val.extend([1, 2])
    good = predict_request("identity", {"x": np.full((1, 2), 5.0)})
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        client = stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.Predict(bad, timeout=5)
        answer = await client.Predict(good, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "float" in raised.value.details()
    np.testing.assert_array_equal(to_array(answer.outputs["y"]), np.full((1, 2), 5.0))


async def test_bytes_that_are_no_predict_request_get_invalid_argument(fleet):
    proxy, _ = fleet
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # and the proxy still serves
        answer = await stub(channel).Predict(
            predict_request("identity", {"x": np.ones((2, 2))}), timeout=5
        )
    assert to_array(answer.outputs["y"]).shape == (2, 2)


async def test_unbatchable_calls_are_forwarded_alone(fleet):
    proxy, _ = fleet
    scalar = predict_pb2.PredictRequest()
    scalar.model_spec.name = "identity"
    scalar.inputs["x"].dtype = tensor_pb2.DT_FLOAT
    scalar.inputs["x"].float_val.append(1.0)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub(channel).Predict(scalar, timeout=5)
    # The identity model wants rank 2: the replica's own answer reaches the caller.
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_classify_is_routed_and_the_replicas_code_kept(fleet):
    proxy, _ = fleet
    request = inference_pb2.ClassificationRequest()
    request.model_spec.name = "identity"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub(channel).Classify(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
