"""--auth_token_file: bearer tokens on gRPC, compared in constant time, never logged."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import requests
from grpc_client import metadata_request, predict_request, stub
from procs import start_replica
from proxy_procs import start_proxy
from test_health import wait_for_status

from batchproxy.auth import TokenAuth
from batchproxy.protos import health_pb2

TOKEN = "s3cr3t-token-for-tests"


def test_token_auth_accepts_only_the_exact_bearer_token():
    auth = TokenAuth(TOKEN)
    assert auth.accepts(f"Bearer {TOKEN}")
    assert auth.accepts(f"Bearer {TOKEN}".encode())
    for wrong in (None, "", TOKEN, f"Bearer {TOKEN}x", f"bearer {TOKEN}", "Bearer "):
        assert not auth.accepts(wrong)
    assert TOKEN not in repr(auth)
    with pytest.raises(ValueError):
        TokenAuth("")


async def test_calls_without_the_token_are_refused_before_any_work(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    replica = start_replica("identity")
    proxy = start_proxy([replica], auth_token_file=token_file)
    request = predict_request("identity", {"x": np.ones((1, 2), np.float32)})
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            for metadata in (None, [("authorization", "Bearer wrong")]):
                for call in (stub(channel).Predict(request, timeout=5, metadata=metadata),
                             stub(channel).GetModelMetadata(metadata_request("identity"),
                                                            timeout=5, metadata=metadata)):
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await call
                    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = [("authorization", f"Bearer {TOKEN}")]
            response = await stub(channel).Predict(request, timeout=5, metadata=good)
            assert "y" in response.outputs
        # Health stays open.
        assert await wait_for_status(proxy.address, health_pb2.HealthCheckResponse.SERVING, 5)
        log = proxy.output()
    finally:
        proxy.stop()
        replica.stop()
    assert TOKEN not in log


def test_rest_calls_without_the_token_get_401_and_health_stays_open(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    replica = start_replica("identity")
    proxy = start_proxy([replica], auth_token_file=token_file)
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    body = {"instances": [[1.0, 2.0]]}
    try:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            response = requests.post(url, json=body, headers=headers, timeout=10)
            assert response.status_code == 401
            assert response.json() == {"error": "missing or invalid bearer token"}
        good = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 10
        while True:  # the replica may still be joining
            response = requests.post(url, json=body, headers=good, timeout=10)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": [[1.0, 2.0]]}
        assert requests.get(f"{proxy.rest_url}/healthz", timeout=5).status_code == 200
        log = proxy.output()
    finally:
        proxy.stop()
        replica.stop()
    assert TOKEN not in log
