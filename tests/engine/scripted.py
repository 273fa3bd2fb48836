"""Scripted replicas for virtual-time engine tests: a Transport (fleet/transport.py) whose
cost, failures and hangs a test sets, answering Predict with an identity model. Everything
runs on the virtual clock of batchproxy.sim.clock, so times in assertions are exact."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2, predict_pb2, tensor_pb2

DT_FLOAT = 1


@dataclass
class Sent:
    at: float
    rows: int
    timeout: float
    values: list[float]


@dataclass
class ScriptedReplica:
    cost_s: float = 0.1
    hung: bool = False
    error: Exception | None = None  # raised for every Predict
    # Refuses a batch holding a negative value, as a model checking its input would.
    refuse_negative: bool = True
    # The models it serves (None: any); others get TFS's NOT_FOUND.
    models: set[str] | None = None
    # What the first Predict costs instead of cost_s (a model's lazy set-up), if set.
    first_cost_s: float | None = None
    # One batch at a time, the next waiting its turn (a GPU with one stream); else each
    # batch runs on its own, however many there are.
    serial: bool = False
    sent: list[Sent] = field(default_factory=list)
    # serial: when each Predict that had to wait for its turn arrived, and how long it waited.
    waited: list[tuple[float, float]] = field(default_factory=list)
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        if path == GET_MODEL_STATUS:
            name = get_model_status_pb2.GetModelStatusRequest.FromString(
                request).model_spec.name
            if self.models is not None and name and name not in self.models:
                raise ProxyError(grpc.StatusCode.NOT_FOUND,
                                 f"Could not find any versions of model {name}")
            status = get_model_status_pb2.GetModelStatusResponse()
            status.model_version_status.add(
                version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
            return status.SerializeToString()
        if path != PREDICT:  # forwarded calls: an empty answer after the cost
            return await self._answer_unbatched(timeout)
        call = codec.decode_predict_request(request)
        data = call.inputs["x"].data
        assert isinstance(data, bytes)
        values = list(memoryview(data).cast("f"))
        self.sent.append(Sent(loop.time(), call.rows, timeout, values))
        await self._spend(timeout)  # a refusal too comes back after the call's time
        if self.models is not None and call.model_name not in self.models:
            raise ProxyError(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Latest({call.model_name})")
        if self.refuse_negative and any(v < 0 for v in values):
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT, "x must not be negative")
        outputs = {name: codec.encode_tensor(t.dtype, t.shape, t.data, False)
                   for name, t in call.inputs.items()}
        return codec.encode_predict_response(outputs, call.model_spec)

    async def _answer_unbatched(self, timeout: float) -> bytes:
        await self._spend(timeout)
        return b""

    async def _spend(self, timeout: float) -> None:
        """The call's cost, or its failure: the set error, or gRPC's DEADLINE_EXCEEDED once
        `timeout` passes first."""
        if self.error is not None:
            raise self.error
        cost = math.inf if self.hung else self.cost_s
        if self.first_cost_s is not None:
            cost, self.first_cost_s = self.first_cost_s, None
        if self.serial:
            loop = asyncio.get_running_loop()
            arrived = loop.time()
            async with asyncio.timeout(timeout):
                await self._turn.acquire()
            if loop.time() > arrived:
                self.waited.append((arrived, loop.time() - arrived))
            try:
                await asyncio.sleep(cost)
            finally:
                self._turn.release()
            return
        if cost > timeout:
            await asyncio.sleep(timeout)
            raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        await asyncio.sleep(cost)

    async def close(self) -> None:
        pass


def request_bytes(values: list[float], model: str = "m") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    tensor = tensor_pb2.TensorProto(dtype=DT_FLOAT)
    tensor.tensor_shape.dim.add(size=len(values))
    tensor.tensor_shape.dim.add(size=1)
    tensor.float_val.extend(values)
    request.inputs["x"].CopyFrom(tensor)
    return request.SerializeToString()


def make_call(values: list[float] | int, model: str = "m") -> codec.PredictCall:
    if isinstance(values, int):
        values = [float(i) for i in range(values)]
    return codec.decode_predict_request(request_bytes(values, model))


def answer_values(response: bytes) -> list[float]:
    message = predict_pb2.PredictResponse.FromString(response)
    tensor = message.outputs["x"]
    if tensor.tensor_content:
        return list(memoryview(tensor.tensor_content).cast("f"))
    return list(tensor.float_val)


def make_pool(replicas: dict[str, ScriptedReplica], max_inflight: int = 1,
              default_timeout_s: float = 30.0, healthy: bool = True) -> ReplicaPool:
    pool = ReplicaPool(list(replicas), max_inflight, default_timeout_s,
                       transports=lambda address: replicas[address], seed=1)
    if healthy:
        for endpoint in pool.replicas.values():
            pool.record_check(endpoint, True)
    return pool


# The flush policy make_engine uses unless a test names one: the fixed rule, whose due times
# (a lone call leaves at batch_timeout_micros) make the times these tests assert exact.
# A test about something either policy must do asks for each (POLICIES) by name.
TESTED_POLICY = "fixed"
POLICIES = ("fixed", "adaptive")


def lone_call_sent_at(policy: str, batch_timeout_micros: int = 2000) -> float:
    """When a call alone in its queue leaves for an idle replica: at its batch timeout
    under the fixed rule; at once under the adaptive policy (no batch started before)."""
    return batch_timeout_micros / 1e6 if policy == "fixed" else 0.0


def make_engine(replicas: dict[str, ScriptedReplica], *, max_batch_size: int = 4,
                batch_timeout_micros: int = 2000, max_inflight: int = 1,
                default_timeout_s: float = 30.0, max_enqueued_rows: int = 64,
                policy: str = TESTED_POLICY, **batching: Any) -> Engine:
    config = BatchingConfig(max_batch_size=max_batch_size,
                            batch_timeout_micros=batch_timeout_micros,
                            max_enqueued_rows=max(max_enqueued_rows, max_batch_size),
                            policy=policy, **batching)
    engine = Engine(config, make_pool(replicas, max_inflight, default_timeout_s))
    engine.start()
    return engine


async def timed(coro_factory: Callable[[], object]) -> tuple[float, object]:
    """(virtual seconds taken, result or the exception raised)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        result = await coro_factory()  # type: ignore[misc]
    except Exception as err:  # the tests look at the error itself
        result = err
    return loop.time() - start, result
