"""Simulated replicas: TFS as the proxy sees it, on the virtual clock.

A replica runs k batches at a time (k = `concurrency`, a GPU's streams or TFS's batch
threads); what it is given beyond that waits, first come first served. A batch of `rows`
rows for model m takes `(a_m + b_m * rows) * speed * slow * jitter` seconds, `jitter` a
log-normal factor of mean 1 drawn from the replica's own seeded generator. Faults come from
its `FaultSchedule`. `network_s` is the round trip between the proxy and the replica, half
each way, paid by every call through `call`: on a real fleet the proxy's own turn, the
network and the replica's decoding sit between one batch's answer and the next one's start.

Two doors lead in. `serve(model, rows, timeout)` is the cost model alone, for the baselines
that need no bytes. `call(path, request, timeout)` is the fleet's `Transport`: it decodes the
merged PredictRequest with the codec, serves it, and answers as an identity model (every
input echoed as an output of the same name), so the proxy's split runs on real bytes; it also
answers GetModelStatus so the fleet's real health checks can run against it.

What a replica received (batch rows) and how long its slots were busy are its own records,
independent of whoever sent the work."""

from __future__ import annotations

import asyncio
import collections
import math
import random
from dataclasses import dataclass, field

import grpc

from batchproxy import codec
from batchproxy.errors import ProxyError
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2
from batchproxy.sim.faults import FaultSchedule

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


@dataclass(frozen=True)
class Cost:
    """Seconds for one batch: `batch_s + row_s * rows`."""

    batch_s: float
    row_s: float

    def of(self, rows: int) -> float:
        return self.batch_s + self.row_s * rows


@dataclass
class ReplicaRecord:
    """What one replica did, as the replica itself saw it."""

    batch_rows: collections.Counter[int] = field(default_factory=collections.Counter)
    busy_s: float = 0.0  # slot-seconds spent working inside the measured window


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(deadline_exceeded())


async def sleep_until(when: float) -> None:
    """Sleep to an absolute virtual time: exact, where `asyncio.sleep(when - now)` would
    round."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    handle = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        handle.cancel()


def deadline_exceeded() -> ProxyError:
    return ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def unavailable(address: str) -> ProxyError:
    return ProxyError(grpc.StatusCode.UNAVAILABLE, f"failed to connect to {address}")


class SimReplica:
    def __init__(self, address: str, index: int, costs: dict[str, Cost], default: Cost,
                 *, concurrency: int = 1, speed: float = 1.0, jitter: float = 0.0,
                 faults: FaultSchedule | None = None, seed: int = 0,
                 window_s: float = math.inf, models: frozenset[str] | None = None,
                 network_s: float = 0.0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.address = address
        self.index = index
        self.costs = costs
        self.default = default
        self.concurrency = concurrency
        self.speed = speed
        self.jitter = jitter
        self.faults = faults or FaultSchedule([])
        # A string seed hashes the same in every process (random's version-2 seeding).
        self.random = random.Random(f"{seed}:replica:{index}")
        self.window_s = window_s  # busy time is counted up to here
        self.models = models  # None: serves any model name
        self.network_s = network_s
        self.record = ReplicaRecord()
        self._free = concurrency
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        # mu of a log-normal with mean 1 and shape `jitter`
        self._jitter_mu = -jitter * jitter / 2

    # -- cost model ------------------------------------------------------------------------

    def cost_s(self, model: str, rows: int, now: float) -> float:
        cost = self.costs.get(model, self.default).of(rows) * self.speed
        cost *= self.faults.slow_factor(now)
        if self.jitter > 0:
            cost *= self.random.lognormvariate(self._jitter_mu, self.jitter)
        return cost

    def _count_busy(self, start: float, end: float) -> None:
        window = self.window_s
        self.record.busy_s += max(0.0, min(end, window) - min(start, window))

    # -- slots -----------------------------------------------------------------------------

    async def _acquire(self, deadline: float | None) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, _expire, future)
        try:
            await future  # _release hands its slot straight to us
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release()  # handed a slot, but nobody will use it
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _release(self) -> None:
        waiting = self._waiting
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, model: str, rows: int, timeout: float | None) -> None:
        """Do one batch's work, or fail the way a TFS replica would."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout is None else now + timeout
        await self._reachable(now, deadline)
        if self.faults.errors:
            rate = self.faults.error_rate(loop.time())
            if rate > 0 and self.random.random() < rate:
                raise unavailable(self.address)
        await self._acquire(deadline)
        start = loop.time()
        end = start + self.cost_s(model, rows, start)
        crash = self.faults.crash_during(start, end) if self.faults.crashes else None
        busy_until = end if crash is None else crash
        self.record.batch_rows[rows] += 1
        self._count_busy(start, busy_until)
        if crash is not None:
            answer_at = crash
        else:
            answer_at = end
            if self.faults.hangs:
                answer_at = self.faults.hang_end(end) or end
        # The slot is busy for the whole work even when the caller gives up first: the
        # replica does not know (a GPU finishes the batch it started).
        if answer_at == busy_until and (deadline is None or deadline >= answer_at):
            # The common case: one timer frees the slot and answers.
            answered = loop.create_future()
            loop.call_at(busy_until, self._finish, answered)
            await answered
        else:
            loop.call_at(busy_until, self._release)
            if deadline is not None and deadline < answer_at:
                await sleep_until(deadline)
                raise deadline_exceeded()
            await sleep_until(answer_at)
        if crash is not None:
            raise ProxyError(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    def _finish(self, answered: asyncio.Future[None]) -> None:
        self._release()
        _wake(answered)

    async def _reachable(self, now: float, deadline: float | None) -> None:
        """Refuse while crashed; hold while hung (until the hang ends or the deadline)."""
        faults = self.faults
        if faults.crashes and faults.crashed(now):
            raise unavailable(self.address)
        if faults.hangs:
            hang_end = faults.hang_end(now)
            if hang_end is not None:
                if deadline is not None and deadline <= hang_end:
                    await sleep_until(deadline)
                    raise deadline_exceeded()
                await sleep_until(hang_end)
                if faults.crashed(hang_end):
                    raise unavailable(self.address)

    # -- the fleet's Transport -------------------------------------------------------------

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == PREDICT:
            return await self._predict(request, timeout)
        if path == GET_MODEL_STATUS:
            return await self._model_status(request, timeout)
        raise ProxyError(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}")

    async def close(self) -> None:
        pass

    def _check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise ProxyError(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Latest({model})")

    async def _predict(self, request: bytes, timeout: float) -> bytes:
        try:
            call = codec.decode_predict_request(request)
        except codec.CodecError as err:
            raise ProxyError.from_codec_error(err) from None
        self._check_model(call.model_name)
        trip = self.network_s / 2
        if trip > 0:
            await asyncio.sleep(trip)  # the request's way there
            timeout = max(timeout - trip, 0.0)
        await self.serve(call.model_name, call.rows, timeout)
        if trip > 0:
            await asyncio.sleep(trip)  # the answer's way back
        outputs = {name: codec.encode_tensor(t.dtype, t.shape, t.data, False)
                   for name, t in call.inputs.items()}
        return codec.encode_predict_response(outputs, call.model_spec)

    async def _model_status(self, request: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        await self._reachable(loop.time(), loop.time() + timeout)
        spec = get_model_status_pb2.GetModelStatusRequest.FromString(request).model_spec
        if not spec.name:
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        self._check_model(spec.name)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = 1
        status.state = AVAILABLE
        return response.SerializeToString()
