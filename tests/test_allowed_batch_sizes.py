"""Allowed batch sizes end to end: a reference replica that, like a compiled model, refuses
every other batch size, behind a proxy that pads each batch up to an allowed size. Real
processes on loopback, gRPC and REST callers mixed, both cores."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import grpc
import numpy as np
import pytest
import requests
from grpc_client import batch_rows_histogram, predict_request, stub, to_array
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

CORES = {"cython": {}, "python": {"BATCHPROXY_NO_EXTENSIONS": "1"}}
SIZES = "4,8,16"


def replica_predicts(rest_url: str) -> dict[str, float]:
    """The replica's Predict calls answered, by status code."""
    text = requests.get(f"{rest_url}/monitoring/prometheus/metrics", timeout=5).text
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "batchproxy_replica_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["method"] == "Predict":
                    codes[sample.labels["code"]] = sample.value
    return codes


@pytest.fixture(scope="module", params=list(CORES))
def padded_fleet(request):
    replicas = [start_replica("identity", batch_cost_ms=20, allowed_batch_sizes=SIZES)
                for _ in range(2)]
    proxy = start_proxy(replicas, env=CORES[request.param], max_batch_size=16,
                        batch_timeout_micros=5000, allowed_batch_sizes=SIZES)
    yield proxy, replicas
    proxy.stop()
    for replica in replicas:
        replica.stop()


def test_the_replica_refuses_other_sizes_as_a_compiled_model_does(padded_fleet):
    _, replicas = padded_fleet
    with grpc.insecure_channel(replicas[0].address) as channel:
        client = stub(channel)
        ok = client.Predict(predict_request("identity", {"x": np.ones((8, 2), np.float32)}),
                            timeout=10)
        assert to_array(ok.outputs["y"]).shape == (8, 2)
        with pytest.raises(grpc.RpcError) as refused:
            client.Predict(predict_request("identity", {"x": np.ones((3, 2), np.float32)}),
                           timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "allowed batch sizes 4, 8, 16" in refused.value.details()


async def test_callers_get_their_own_rows_and_the_replica_sees_only_allowed_sizes(
        padded_fleet):
    proxy, replicas = padded_fleet
    refused_before = sum(replica_predicts(r.rest_url).get("INVALID_ARGUMENT", 0)
                         for r in replicas)
    rows_before = [batch_rows_histogram(r.rest_url) for r in replicas]
    rng = random.Random(14)
    rows = [rng.randint(1, 7) for _ in range(90)]
    inputs = [(i * 100 + np.arange(n * 3).reshape(n, 3)).astype(np.float32)
              for i, n in enumerate(rows)]

    async with grpc.aio.insecure_channel(proxy.address) as channel, \
            aiohttp.ClientSession() as session:
        client = stub(channel)

        async def call(i: int) -> np.ndarray:
            if i % 3:
                response = await client.Predict(
                    predict_request("identity", {"x": inputs[i]}, typed=i % 2 == 0),
                    timeout=30)
                return to_array(response.outputs["y"])
            url = f"{proxy.rest_url}/v1/models/identity:predict"
            async with session.post(url, json={"instances": inputs[i].tolist()},
                                    timeout=aiohttp.ClientTimeout(total=30)) as reply:
                assert reply.status == 200, await reply.text()
                return np.array((await reply.json())["predictions"], np.float32)

        answers = await asyncio.gather(*(call(i) for i in range(len(rows))))
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, inputs[i])  # the identity: its answer alone
    refused = sum(replica_predicts(r.rest_url).get("INVALID_ARGUMENT", 0) for r in replicas)
    assert refused == refused_before, "the replica was sent a batch of a size it refuses"
    after = [batch_rows_histogram(r.rest_url) for r in replicas]
    # Every batch the replicas ran had 4, 8 or 16 rows: none fell in (0,2], (2,4) is
    # told apart by the sum, so check the total rows are a sum of allowed sizes.
    sent = sum(a["sum"] - b.get("sum", 0) for a, b in zip(after, rows_before, strict=True))
    assert sent >= sum(rows) and sent % 4 == 0
    assert all(a.get("le=2", 0) == b.get("le=2", 0)
               for a, b in zip(after, rows_before, strict=True))
