"""Active health checks: every interval, each replica is asked GetModelStatus for every model
the proxy has seen (or was told to watch); the answers decide which replicas serve which
model. With no model known yet, any answer but UNAVAILABLE or a timeout shows the replica is
up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc

from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import Endpoint, ModelState, ReplicaPool, ReplicaState
from batchproxy.methods import GET_MODEL_STATUS
from batchproxy.protos import get_model_status_pb2
from batchproxy.supervisor import cancel_and_wait

if TYPE_CHECKING:
    from batchproxy.supervisor import Supervisor

log = logging.getLogger(__name__)

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
# Answers that show a replica is down rather than that it dislikes the question.
DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def status_request(model: str) -> bytes:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    return request.SerializeToString()


def model_state(response: bytes) -> ModelState:
    return read_status(response)[0]


def read_status(response: bytes) -> tuple[ModelState, dict[int, int]]:
    """The model's state on the replica (AVAILABLE when any version is) and every version it
    lists, version -> state: the fleet-wide view of versions is built from these."""
    status = get_model_status_pb2.GetModelStatusResponse.FromString(response)
    versions = {v.version: int(v.state) for v in status.model_version_status}
    if any(state == AVAILABLE for state in versions.values()):
        return ModelState.AVAILABLE, versions
    return ModelState.UNAVAILABLE, versions


class HealthChecker:
    def __init__(self, pool: ReplicaPool, interval_s: float = 1.0,
                 models: tuple[str, ...] = ()) -> None:
        self.pool = pool
        self.interval_s = interval_s
        # At least a second: on a busy machine a healthy replica's answer can take longer
        # than a short interval, and a slow answer is not a dead replica.
        self.timeout_s = max(min(interval_s, 2.0), 1.0)
        self.configured = set(models)
        for model in models:
            pool.note_model(model)
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Check every interval: under `supervisor` when given (it restarts the loop should
        it die, and cancels it on close), else as a task of our own."""
        if supervisor is not None:
            supervisor.spawn("health_checks", self.run)
        else:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def check_soon(self) -> None:
        """Run a round now (a replica joined, a model appeared)."""
        self._kick.set()

    async def check_all(self) -> None:
        replicas = [r for r in self.pool.replicas.values()
                    if r.state is not ReplicaState.DRAINING]
        await asyncio.gather(*(self.check(replica) for replica in replicas))
        self.pool.forget_missing_models(self.configured)
        await self.pool.close_dropped()

    async def run(self) -> None:
        """The loop: a round of checks, then wait for the interval or a kick."""
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.interval_s)
            self._kick.clear()

    async def check(self, replica: Endpoint) -> None:
        models = sorted(self.pool.known_models)
        states: dict[str, ModelState] = {}
        versions: dict[str, dict[int, int]] = {}
        loop = asyncio.get_running_loop()
        # A replica already in service is past its channel's first call (a connection set
        # up), so its check times the round trip alone.
        timed = replica.state is ReplicaState.HEALTHY
        for model in models or [""]:
            started = loop.time()
            try:
                response = await replica.transport.call(GET_MODEL_STATUS, status_request(model),
                                                        self.timeout_s)
            except ProxyError as err:
                if err.code in DOWN:
                    # Refused is down for sure; no answer in time may be a busy machine.
                    self.pool.record_check(replica, False,
                                           f"GetModelStatus: {err.code.name} {err.message}",
                                           certain=err.code is grpc.StatusCode.UNAVAILABLE)
                    return
                if model and err.code == grpc.StatusCode.NOT_FOUND:
                    states[model] = ModelState.MISSING
                continue  # UNIMPLEMENTED and the like: up, but says nothing of the model
            if timed:
                replica.note_trip(loop.time() - started)
                timed = False  # one sample a round
            if model:
                states[model], versions[model] = read_status(response)
        self.pool.record_check(replica, True, "health check passed", states,
                               versions=versions)
