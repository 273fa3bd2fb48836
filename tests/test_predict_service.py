"""The predict service, with a fake engine: which calls are batched, which forwarded, what is
refused, and how each call is observed once."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_client import predict_request

from batchproxy import codec
from batchproxy.errors import ProxyError
from batchproxy.frontends.limits import RequestLimits
from batchproxy.frontends.predict_service import PredictService, unbatched_request
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.metrics import ProxyMetrics
from batchproxy.priority import Priority
from batchproxy.protos import predict_pb2


class FakeEngine:
    def __init__(self) -> None:
        self.submitted: list[codec.PredictCall] = []
        self.priorities: list[Priority | None] = []
        self.forwarded: list[tuple[str, bytes, float | None, str]] = []
        self.error: ProxyError | None = None

    async def submit(self, call: codec.PredictCall, timeout: float | None = None,
                     priority: Priority | None = None) -> bytes:
        self.submitted.append(call)
        self.priorities.append(priority)
        if self.error is not None:
            raise self.error
        return b"batched"

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes:
        self.forwarded.append((path, request, timeout, model))
        return b"forwarded"


def counter(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def service() -> PredictService:
    return PredictService(FakeEngine(), ProxyMetrics(), RequestLimits(max_rows=8))


async def test_a_call_with_rows_is_batched(service):
    request = predict_request("m", {"x": np.ones((3, 2), np.float32)}).SerializeToString()
    assert await service.predict_bytes(request, 1.0) == b"batched"
    (call,) = service.engine.submitted
    assert (call.model_name, call.rows) == ("m", 3)
    assert service.engine.forwarded == []
    # No priority named: None, so the engine applies the model's default class.
    assert service.engine.priorities == [None]


async def test_the_priority_goes_with_a_batched_call(service):
    request = predict_request("m", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    await service.predict_bytes(request, 1.0, priority=Priority.SHEDDABLE)
    assert service.engine.priorities == [Priority.SHEDDABLE]


async def test_an_unbatchable_call_is_forwarded_as_it_came(service):
    request = predict_request("m", {"x": np.float32(1.0)}).SerializeToString()  # a scalar
    assert await service.predict_bytes(request, 2.0) == b"forwarded"
    assert service.engine.forwarded == [(PREDICT, request, 2.0, "m")]


async def test_an_unbatchable_decoded_call_is_encoded_for_forwarding(service):
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = "m"
    call = codec.PredictCall(model_name="m", model_spec=spec.SerializeToString(),
                             inputs={"x": codec.Tensor(1, (), b"\x00\x00\x80?")})
    assert call.rows <= 0
    assert await service.predict(call, None) == b"forwarded"
    ((path, request, _, model),) = service.engine.forwarded
    assert (path, model) == (PREDICT, "m")
    sent = predict_pb2.PredictRequest.FromString(request)
    assert sent.model_spec.name == "m" and sent.inputs["x"].dtype == 1
    assert request == unbatched_request(call)


async def test_invalid_and_too_large_calls_are_refused_and_counted(service):
    with pytest.raises(ProxyError) as raised:
        await service.predict_bytes(b"\xff\xff not a request", 1.0)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    too_many = predict_request("m", {"x": np.ones((9, 2), np.float32)}).SerializeToString()
    with pytest.raises(ProxyError, match="--max_rows_per_request"):
        await service.predict_bytes(too_many, 1.0)
    metrics = service.metrics
    assert counter(metrics, "batchproxy_rejected_requests_total", reason="invalid") == 1
    assert counter(metrics, "batchproxy_rejected_requests_total", reason="too_large") == 1
    assert service.engine.submitted == [] and service.engine.forwarded == []


async def test_other_methods_are_forwarded(service):
    assert await service.forward(GET_MODEL_STATUS, b"req", 3.0, model="m") == b"forwarded"
    assert service.engine.forwarded == [(GET_MODEL_STATUS, b"req", 3.0, "m")]


async def test_each_call_is_observed_once_with_its_code(service):
    metrics = service.metrics
    service.engine.error = ProxyError(grpc.StatusCode.UNAVAILABLE, "queue full")
    request = predict_request("m", {"x": np.ones((1, 2), np.float32)}).SerializeToString()
    with pytest.raises(ProxyError), service.observe("grpc", "Predict") as record:
        await service.predict_bytes(request, 1.0, record)
    assert counter(metrics, "batchproxy_requests_total", transport="grpc", method="Predict",
                   model="m", code="UNAVAILABLE") == 1

    async def hang() -> None:
        with service.observe("rest", "Predict", "m"):
            await asyncio.Event().wait()

    task = asyncio.ensure_future(hang())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counter(metrics, "batchproxy_requests_total", transport="rest", method="Predict",
                   model="m", code="CANCELLED") == 1
    with service.observe("rest", "GetModelStatus", "m") as record:
        record.code = "HTTP_413"  # a frontend's own code is kept
    assert counter(metrics, "batchproxy_requests_total", transport="rest",
                   method="GetModelStatus", model="m", code="HTTP_413") == 1
    assert metrics.calls_handled == 3
