"""HandleReloadConfigRequest is refused with UNIMPLEMENTED and the reason: forwarded, it
would reconfigure the one replica that took it and leave the rest of the fleet as it was.
TFS has no REST form of it, so gRPC is the only way in."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import requests
from grpc_client import status_request
from procs import Process, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.frontends.grpc import RELOAD_REFUSAL
from batchproxy.protos import services_pb2, services_pb2_grpc


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    with start_replica("identity") as a, start_replica("identity") as b, \
            start_proxy([a, b]) as proxy:
        yield proxy


def reload_codes(proxy: Process) -> dict[str, float]:
    text = requests.get(f"{proxy.rest_url}/metrics", timeout=10).text
    return {sample.labels["code"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "batchproxy_requests_total"
            and sample.labels["method"] == "HandleReloadConfigRequest"}


def test_reload_config_is_refused_with_the_reason(proxy: Process) -> None:
    with grpc.insecure_channel(proxy.address) as channel:
        models = services_pb2_grpc.ModelServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as raised:
                models.HandleReloadConfigRequest(services_pb2.ReloadConfigRequest(),
                                                 timeout=30)
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert raised.value.details() == RELOAD_REFUSAL
    assert "one replica" in RELOAD_REFUSAL
    deadline = time.monotonic() + 10
    while reload_codes(proxy) != {"UNIMPLEMENTED": 3.0}:
        assert time.monotonic() < deadline, reload_codes(proxy)
        time.sleep(0.1)


def test_the_other_model_service_method_is_still_forwarded(proxy: Process) -> None:
    with grpc.insecure_channel(proxy.address) as channel:
        status = services_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status_request("identity"), timeout=30)
    assert status.model_version_status[0].state == 30  # AVAILABLE
