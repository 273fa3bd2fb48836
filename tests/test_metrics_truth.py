"""What /metrics says is what happened: a replica gone from discovery loses its series
(it is not reported healthy forever, and DNS churn piles up no label sets); a forwarded
gRPC call is counted under the model it names; a bug in a handler is counted, and
answered, as INTERNAL; every rejection reason is exported at 0 from the start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import requests
from dns_server import DnsServer
from grpc_client import metadata_request, predict_request, status_request, stub
from procs import Process, free_port, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.errors import INTERNAL_ERROR_MESSAGE
from batchproxy.frontends.grpc import PredictionHandlers, generic_handlers
from batchproxy.frontends.predict_service import PredictService
from batchproxy.metrics import REJECT_REASONS, ProxyMetrics
from batchproxy.protos import services_pb2_grpc

NAME = "replicas.batchproxy.test."
WAIT_S = 30.0

Samples = list[tuple[str, dict[str, str], float]]


def samples(proxy: Process) -> Samples:
    text = requests.get(f"{proxy.rest_url}/metrics", timeout=10).text
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def wait_until(proxy: Process, holds: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = samples(proxy)
        if holds(found):
            return found
        assert time.monotonic() < deadline, f"never: {what}\n{found}"
        time.sleep(0.1)


def replica_series(found: Samples) -> dict[str, dict[str, float]]:
    """{series name: {replica: value}} of every per-replica series."""
    series: dict[str, dict[str, float]] = {}
    for name, labels, value in found:
        if "replica" in labels:
            series.setdefault(name, {})[labels["replica"]] = value
    return series


def healthy(found: Samples) -> dict[str, float]:
    return replica_series(found).get("batchproxy_replica_healthy", {})


# --- replicas that come and go ----------------------------------------------------------------


@pytest.fixture
def discovered_fleet() -> Iterator[tuple[DnsServer, int, Process]]:
    """Two replicas on loopback addresses of their own, one port, found through DNS."""
    port = free_port()
    with DnsServer() as dns, start_replica("identity", host="127.0.0.2", port=port), \
            start_replica("identity", host="127.0.0.3", port=port):
        dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
        with start_proxy([], replicas_dns=f"{NAME}:{port}",
                         dns_server=f"127.0.0.1:{dns.port}", dns_refresh_s=0.2,
                         health_interval_ms=200) as proxy:
            yield dns, port, proxy


def test_a_replica_gone_from_dns_loses_its_series(discovered_fleet) -> None:
    dns, port, proxy = discovered_fleet
    both = {f"127.0.0.2:{port}": 1.0, f"127.0.0.3:{port}": 1.0}
    wait_until(proxy, lambda found: healthy(found) == both, "both replicas healthy")
    with grpc.insecure_channel(proxy.address) as channel:  # batches_total for each
        for _ in range(8):
            stub(channel).Predict(predict_request("identity", {"x": np.ones((1, 2))}),
                                  timeout=30)
    # Churn: addresses that never answer come and go, then only b is left.
    for addresses in (["127.0.0.3", "127.0.0.9"], ["127.0.0.3", "127.0.0.10"], ["127.0.0.3"]):
        dns.set(NAME, addresses)
        wanted = {f"{address}:{port}" for address in addresses}
        wait_until(proxy, lambda found, wanted=wanted: all(
            set(values) <= wanted for values in replica_series(found).values())
            and set(healthy(found)) == wanted,
            f"series only for {sorted(wanted)}")
    found = wait_until(proxy, lambda found: healthy(found) == {f"127.0.0.3:{port}": 1.0},
                       "b alone, healthy")
    for name, values in replica_series(found).items():
        assert set(values) == {f"127.0.0.3:{port}"} or not values, (name, values)


def test_sampling_forgets_replicas_that_left() -> None:
    metrics = ProxyMetrics()
    metrics.sample_replicas({"a:1": (1, True), "b:1": (0, True)})
    metrics.observe_batch("a:1", rows=4, calls=2)
    metrics.sample_replicas({"b:1": (2, False)})
    text = metrics.exposition().decode()
    assert 'replica="a:1"' not in text
    assert 'batchproxy_replica_healthy{replica="b:1"} 0.0' in text
    # A replica that comes back starts its series again.
    metrics.sample_replicas({"a:1": (0, True)})
    metrics.observe_batch("a:1", rows=1, calls=1)
    assert 'batchproxy_batches_total{replica="a:1"} 1.0' in metrics.exposition().decode()


# --- what calls are counted as ----------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    with start_replica("identity", model_name="mm") as replica, \
            start_proxy([replica]) as proxy:
        yield proxy


def test_every_rejection_reason_is_exported_from_the_start(proxy: Process) -> None:
    rejected = {labels["reason"]: value for name, labels, value in samples(proxy)
                if name == "batchproxy_rejected_requests_total"}
    assert set(REJECT_REASONS) <= set(rejected)
    assert all(rejected[reason] == 0 for reason in REJECT_REASONS)


def request_count(found: Samples, method: str) -> dict[tuple[str, str], float]:
    return {(labels["model"], labels["code"]): value for name, labels, value in found
            if name == "batchproxy_requests_total" and labels["transport"] == "grpc"
            and labels["method"] == method}


def test_forwarded_grpc_calls_count_their_model(proxy: Process) -> None:
    with grpc.insecure_channel(proxy.address) as channel:
        stub(channel).GetModelMetadata(metadata_request("mm"), timeout=30)
        services_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request("mm"),
                                                                   timeout=30)
        with pytest.raises(grpc.RpcError):
            stub(channel).GetModelMetadata(metadata_request("absent"), timeout=30)
    found = wait_until(proxy, lambda found: ("absent", "NOT_FOUND") in request_count(
        found, "GetModelMetadata"), "the calls counted")
    assert request_count(found, "GetModelMetadata") == {("mm", "OK"): 1.0,
                                                        ("absent", "NOT_FOUND"): 1.0}
    assert request_count(found, "GetModelStatus") == {("mm", "OK"): 1.0}


class BrokenEngine:
    """Fails the way a bug would."""

    async def submit(self, call, timeout=None, priority=None) -> bytes:
        raise RuntimeError("secret internals")

    async def forward(self, path, request, timeout, model="") -> bytes:
        raise RuntimeError("secret internals")


async def test_a_bug_in_a_handler_is_counted_and_answered_as_internal() -> None:
    service = PredictService(BrokenEngine())
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(generic_handlers(PredictionHandlers(service)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = [(services_pb2_grpc.PredictionServiceStub(channel).Predict,
                      predict_request("mm", {"x": np.ones((1, 2))})),
                     (services_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata,
                      metadata_request("mm"))]
            for method, request in calls:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await method(request, timeout=10)
                assert raised.value.code() is grpc.StatusCode.INTERNAL
                assert raised.value.details() == INTERNAL_ERROR_MESSAGE
    finally:
        await server.stop(0)
    await asyncio.sleep(0)
    counted = {(key[1], key[2], key[3]) for key in service.metrics._request_children}
    assert counted == {("Predict", "mm", "INTERNAL"), ("GetModelMetadata", "mm", "INTERNAL")}
