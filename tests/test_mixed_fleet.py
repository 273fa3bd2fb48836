"""A fleet whose replicas serve different models: replica A only `m`, replica B only `echo`,
A listed first. REST-only clients of `echo` are answered (their first call is a signature
fetch, which used to go to A and come back 404 every time), and so are the other forwarded
calls; a model no replica has is still TFS's NOT_FOUND.

Health checks are made rare here, so that nothing but the calls themselves can teach the
proxy which replica has which model."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import requests
from grpc_client import metadata_request, status_request, stub
from procs import Process, start_replica
from proxy_procs import start_proxy

from batchproxy.protos import services_pb2_grpc

CALLS = 40


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    with start_replica("identity", model_name="m") as only_m, \
            start_replica("identity", model_name="echo") as only_echo, \
            start_proxy([only_m, only_echo], health_interval_ms=600_000) as proxy:
        yield proxy


def rest_predict(proxy: Process, model: str) -> requests.Response:
    return requests.post(f"{proxy.rest_url}/v1/models/{model}:predict",
                         json={"instances": [[1.0, 2.0]]}, timeout=30)


def test_rest_predict_reaches_the_replica_that_has_the_model(proxy: Process) -> None:
    for model in ("echo", "m"):
        for _ in range(CALLS):
            response = rest_predict(proxy, model)
            assert response.status_code == 200, (model, response.text)
            assert response.json() == {"predictions": [[1.0, 2.0]]}


def test_rest_status_and_metadata_of_either_model(proxy: Process) -> None:
    for model in ("echo", "m"):
        status = requests.get(f"{proxy.rest_url}/v1/models/{model}", timeout=30)
        assert status.status_code == 200, status.text
        assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"
        metadata = requests.get(f"{proxy.rest_url}/v1/models/{model}/metadata", timeout=30)
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["model_spec"]["name"] == model


def test_grpc_forwarded_calls_of_a_model_not_seen_before() -> None:
    # A proxy of its own, that has never heard of either model.
    with start_replica("identity", model_name="m") as only_m, \
            start_replica("identity", model_name="echo") as only_echo, \
            start_proxy([only_m, only_echo], health_interval_ms=600_000) as fresh, \
            grpc.insecure_channel(fresh.address) as channel:
        models = services_pb2_grpc.ModelServiceStub(channel)
        for model in ("echo", "m"):
            answer = stub(channel).GetModelMetadata(metadata_request(model), timeout=30)
            assert answer.model_spec.name == model
            status = models.GetModelStatus(status_request(model), timeout=30)
            assert status.model_version_status[0].version == 1


def test_a_model_no_replica_has_is_not_found(proxy: Process) -> None:
    response = rest_predict(proxy, "nowhere")
    assert response.status_code == 404, response.text
    assert "nowhere" in response.json()["error"]
    # And the others are still served.
    assert rest_predict(proxy, "echo").status_code == 200


def test_grpc_predict_of_a_model_not_seen_before_reaches_the_replica_that_has_it() -> None:
    # gRPC clients send Predict first, with no signature fetch to teach the proxy: the
    # batch that meets a replica lacking the model is sent to the other one.
    import numpy as np
    from grpc_client import predict_request, to_array

    with start_replica("identity", model_name="m") as only_m, \
            start_replica("identity", model_name="echo") as only_echo, \
            start_proxy([only_m, only_echo], health_interval_ms=600_000) as fresh, \
            grpc.insecure_channel(fresh.address) as channel:
        for model in ("echo", "m"):
            for i in range(CALLS):
                x = np.full((1, 2), i, np.float32)
                answer = stub(channel).Predict(predict_request(model, {"x": x}), timeout=30)
                np.testing.assert_array_equal(to_array(answer.outputs["y"]), x)
