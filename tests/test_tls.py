"""TLS and mutual TLS on the proxy's gRPC port and towards replicas, with certificates made
at test time."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
from certs import make_certs
from grpc_client import predict_request, stub, to_array
from procs import start_replica
from proxy_procs import start_proxy


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    made = make_certs()
    return made, made.write(directory), directory


async def predict(channel: grpc.aio.Channel) -> np.ndarray:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = await stub(channel).Predict(predict_request("identity", {"x": x}), timeout=5)
    np.testing.assert_array_equal(to_array(response.outputs["y"]), x)
    return x


async def test_tls_on_the_grpc_port(certs):
    made, _, directory = certs
    replica = start_replica("identity")
    proxy = start_proxy([replica], ssl_config_file=made.ssl_config(directory / "tls.conf"))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=made.ca)
        async with grpc.aio.secure_channel(proxy.address, credentials) as channel:
            await predict(channel)
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await predict(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.stop()
        replica.stop()


async def test_mutual_tls_refuses_clients_without_a_certificate(certs):
    made, _, directory = certs
    replica = start_replica("identity")
    proxy = start_proxy([replica], ssl_config_file=made.ssl_config(directory / "mtls.conf",
                                                                   client_verify=True))
    try:
        with_cert = grpc.ssl_channel_credentials(made.ca, made.client_key, made.client_cert)
        async with grpc.aio.secure_channel(proxy.address, with_cert) as channel:
            await predict(channel)
        without = grpc.ssl_channel_credentials(root_certificates=made.ca)
        async with grpc.aio.secure_channel(proxy.address, without) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await predict(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.stop()
        replica.stop()


async def test_mutual_tls_to_replicas(certs):
    made, paths, directory = certs
    replica = start_replica("identity",
                            ssl_config_file=made.ssl_config(directory / "replica.conf",
                                                            client_verify=True))
    trusted = start_proxy([replica], replica_ca=paths["ca"], replica_cert=paths["client_cert"],
                          replica_key=paths["client_key"])
    untrusted = start_proxy([replica], replica_ca=paths["ca"], health_interval_ms=200)
    try:
        async with grpc.aio.insecure_channel(trusted.address) as channel:
            await predict(channel)
        async with grpc.aio.insecure_channel(untrusted.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await predict(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        trusted.stop()
        untrusted.stop()
        replica.stop()


def test_tls_on_the_rest_port(certs):
    made, paths, directory = certs
    replica = start_replica("identity")
    proxy = start_proxy([replica], ssl_config_file=made.ssl_config(directory / "rest.conf"))
    try:
        url = f"https://127.0.0.1:{proxy.rest_port}/healthz"
        response = requests.get(url, verify=str(paths["ca"]), timeout=5)
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{proxy.rest_port}/healthz", timeout=5)
    finally:
        proxy.stop()
        replica.stop()
