"""Shadow traffic: a sampled copy of a model's batches goes to its shadow version; the
answer is compared with the one callers already got and then dropped, so it never reaches
a caller and never delays one.

Extra load is bounded twice: a share of batches (`sample`) and a cap on shadow batches in
flight (`max_inflight`); a copy also needs a free slot on a replica holding the shadow
version at once (it never waits for one), else it is skipped and counted."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from batchproxy import codec
from batchproxy.codec.dtypes import NUMPY_DTYPES
from batchproxy.engine.queues import Batch
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import Endpoint, ReplicaPool
from batchproxy.fleet.versions import VersionRouter, version_override
from batchproxy.methods import PREDICT
from batchproxy.metrics import ProxyMetrics
from batchproxy.protos import predict_pb2

log = logging.getLogger(__name__)


class Shadower:
    def __init__(self, pool: ReplicaPool, metrics: ProxyMetrics,
                 versions: VersionRouter) -> None:
        self.pool = pool
        self.metrics = metrics
        self.versions = versions
        self.inflight: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe_copy(self, batch: Batch, primary: bytes) -> None:
        """After `batch` was answered with `primary`: copy it to the shadow version when the
        model has one, the draw says so and the bounds allow."""
        shadow = self.versions.settings_of(batch.model).shadow
        if shadow is None or batch.version == shadow.version:
            return
        if self.versions.random.random() >= shadow.sample:
            return
        model = batch.model
        if self.inflight.get(model, 0) >= shadow.max_inflight:
            self.metrics.shadow(model, "skipped")
            return
        replica = self.pool.try_acquire(model, version=shadow.version)
        if replica is None or not replica.serves(model, shadow.version):
            if replica is not None:
                self.pool.release(replica)
            self.metrics.shadow(model, "skipped")
            return
        self.inflight[model] = self.inflight.get(model, 0) + 1
        request = batch.request + version_override(shadow.version)
        task = asyncio.get_running_loop().create_task(
            self._run(replica, model, request, primary))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, replica: Endpoint, model: str, request: bytes,
                   primary: bytes) -> None:
        try:
            try:
                answer = await self.pool.call(replica, PREDICT, request, None)
            except ProxyError as err:
                log.debug("shadow batch for %s failed: %s", model, err.message)
                self.metrics.shadow(model, "error")
                return
            outcome, difference = compare(primary, answer)
            self.metrics.shadow(model, outcome, difference)
        except Exception:  # a comparison bug must never reach the data path
            log.exception("shadow comparison for model '%s' failed", model)
        finally:
            self.pool.release(replica)
            self.inflight[model] -= 1

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks))


def outputs_of(response: bytes) -> dict[str, codec.Tensor]:
    message = predict_pb2.PredictResponse.FromString(response)
    return {name: codec.decode_tensor(tensor.SerializeToString())
            for name, tensor in message.outputs.items()}


def compare(primary: bytes, shadow: bytes) -> tuple[str, float | None]:
    """("compared", max abs difference over every output), or the kind of mismatch:
    "shape" when the outputs or their shapes differ, "dtype" when their types do."""
    ours, theirs = outputs_of(primary), outputs_of(shadow)
    if ours.keys() != theirs.keys():
        return "shape", None
    worst = 0.0
    for name, tensor in ours.items():
        other = theirs[name]
        if tensor.shape != other.shape:
            return "shape", None
        if tensor.dtype != other.dtype:
            return "dtype", None
        if isinstance(tensor.data, list) or isinstance(other.data, list):
            if tensor.data != other.data:
                worst = max(worst, 1.0)  # strings: equal or not
            continue
        kind = NUMPY_DTYPES.get(tensor.dtype)
        if kind is None:
            worst = max(worst, 0.0 if tensor.data == other.data else 1.0)
            continue
        a = np.frombuffer(tensor.data, dtype=kind).astype(np.float64)
        b = np.frombuffer(other.data, dtype=kind).astype(np.float64)
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
    return "compared", worst
