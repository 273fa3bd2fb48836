"""Forwarded calls in a fleet whose replicas serve different models, exactly: a replica
that answers NOT_FOUND is routed around and the next one that may have the model is asked,
each replica once; NOT_FOUND is the answer only when none has it. A replica still joining
counts as one that may have it, for forwarded calls and batches alike."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ModelState, ReplicaPool, ReplicaState, Route
from batchproxy.methods import GET_MODEL_METADATA


@dataclass
class OneModelReplica:
    """Answers forwarded calls for its own model; NOT_FOUND, as TFS says it, for others."""

    model: str
    calls: list[str] = field(default_factory=list)

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        model = request.decode()
        self.calls.append(model)
        if model != self.model:
            raise ProxyError(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Latest({model})")
        return f"metadata of {model}".encode()

    async def close(self) -> None:
        pass


def fleet(*models: str) -> tuple[ReplicaPool, Engine, list[OneModelReplica]]:
    replicas = {f"r{i}:1": OneModelReplica(model) for i, model in enumerate(models)}
    pool = ReplicaPool(list(replicas), transports=replicas.__getitem__, seed=1)
    return pool, Engine(BatchingConfig(), pool), list(replicas.values())


def forward(engine: Engine, model: str) -> bytes:
    # The scripted replicas read the model from the request itself.
    return asyncio.run(engine.forward(GET_MODEL_METADATA, model.encode(), 5.0, model=model))


def test_the_replica_that_has_the_model_answers_and_the_other_is_routed_around() -> None:
    pool, engine, (only_m, only_echo) = fleet("m", "echo")
    for replica in pool.replicas.values():
        pool.record_check(replica, True)  # up; no model checked yet
    assert forward(engine, "echo") == b"metadata of echo"
    assert only_m.calls == ["echo"] and only_echo.calls == ["echo"]
    # The NOT_FOUND taught the pool: the next call, and batches, go to the right one.
    assert pool.route("echo") is Route.SERVED
    assert [r.address for r in pool.replicas.values() if r.serves("echo")] == ["r1:1"]
    assert forward(engine, "echo") == b"metadata of echo"
    assert only_m.calls == ["echo"]
    assert "echo" in pool.known_models  # health checks cover it from now on


def test_a_model_no_replica_has_is_not_found_after_asking_each_once() -> None:
    pool, engine, replicas = fleet("m", "echo", "other")
    for replica in pool.replicas.values():
        pool.record_check(replica, True)
    with pytest.raises(ProxyError) as raised:
        forward(engine, "nowhere")
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert [r.calls for r in replicas] == [["nowhere"]] * 3


def test_a_joining_replica_may_have_the_model() -> None:
    pool, engine, (only_m, only_echo) = fleet("m", "echo")
    first, second = pool.replicas.values()
    # The first replica passed its check and lacks the model; the second is still joining.
    pool.note_model("echo")
    pool.record_check(first, True, models={"echo": ModelState.MISSING})
    assert second.state is ReplicaState.JOINING
    # Batches wait for the joining replica's check rather than take the first's NOT_FOUND.
    assert pool.route("echo") is Route.WAIT
    assert forward(engine, "echo") == b"metadata of echo"
    assert only_m.calls == ["echo"] and only_echo.calls == ["echo"]
    pool.record_check(second, True, models={"echo": ModelState.MISSING})
    assert pool.route("echo") is Route.MISSING
