"""--max_rows_per_request and --max_rank, on both transports."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
from grpc_client import predict_request, stub, to_array
from procs import start_replica
from proxy_procs import start_proxy

from batchproxy import codec
from batchproxy.errors import ProxyError
from batchproxy.frontends.limits import RequestLimits


def call(shape: tuple[int, ...]) -> codec.PredictCall:
    data = np.zeros(shape, np.float32).tobytes()
    return codec.PredictCall(model_name="m", inputs={"x": codec.Tensor(1, shape, data)})


def test_request_limits():
    limits = RequestLimits(max_rows=4, max_rank=2)
    limits.check(call((4, 3)))
    with pytest.raises(ProxyError, match="the request has 5 rows; the limit is 4"):
        limits.check(call((5, 3)))
    with pytest.raises(ProxyError, match="input x has 3 dimensions; the limit is 2"):
        limits.check(call((1, 1, 1)))


@pytest.fixture(scope="module")
def proxy():
    replica = start_replica("identity")
    proxy = start_proxy([replica], max_rows_per_request=4, max_rank=2)
    yield proxy
    proxy.stop()
    replica.stop()


async def test_grpc_calls_over_the_limits_are_refused(proxy):
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        client = stub(channel)
        for shape, message in (((5, 2), "rows"), ((1, 1, 2), "dimensions")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.Predict(predict_request("identity", {"x": np.ones(shape)}),
                                     timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in raised.value.details()
        answer = await client.Predict(predict_request("identity", {"x": np.ones((4, 2))}),
                                      timeout=10)
    assert to_array(answer.outputs["y"]).shape == (4, 2)


def test_rest_calls_over_the_limits_are_refused(proxy):
    url = f"{proxy.rest_url}/v1/models/identity:predict"
    too_many = requests.post(url, json={"instances": [[1.0, 2.0]] * 5}, timeout=10)
    assert too_many.status_code == 400
    assert "the limit is 4" in too_many.json()["error"]
    good = requests.post(url, json={"instances": [[1.0, 2.0]] * 4}, timeout=10)
    assert good.status_code == 200, good.text
