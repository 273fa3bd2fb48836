"""What both frontends do with a call once their transport has delivered it, so that gRPC
and REST differ only in how bytes and JSON arrive and leave.

- Validation: a call that cannot be decoded, or breaks the request limits, is refused alone
  (INVALID_ARGUMENT) and counted once, under its reason.
- Routing: a batchable Predict (rows >= 1) is submitted to the engine's batch queues; an
  unbatchable one (scalars, disagreeing dimension 0, no rows) and every other method
  (metadata, status, classify, regress, multi-inference) are forwarded by the engine, under
  the same admission and retry policy.
- Metrics: each call is observed once, with the transport, method, model and final code.
- Priority: the class the transport read from the call's metadata or headers
  (batchproxy.priority) goes with a batched call to the engine, which orders and sheds by it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Protocol

from batchproxy import codec
from batchproxy.errors import ProxyError
from batchproxy.frontends.limits import RequestLimits
from batchproxy.methods import PREDICT
from batchproxy.metrics import ProxyMetrics
from batchproxy.priority import Priority
from batchproxy.protos import predict_pb2


class Forward(Protocol):
    """Sends one unbatched call to a replica and returns its serialized answer."""

    async def __call__(self, path: str, request: bytes, timeout: float | None,
                       model: str = "") -> bytes: ...


class Engine(Protocol):
    """What the service needs of batchproxy.engine.Engine (a fake will do in tests)."""

    async def submit(self, call: codec.PredictCall, timeout: float | None = None,
                     priority: Priority | None = None) -> bytes: ...

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes: ...


class CallRecord:
    """What the metrics say of one call. Frontends fill in what only they know (the method
    after routing, a transport-specific code such as HTTP_413).

    It is also the context manager PredictService.observe() returns, a plain class rather
    than a generator-based one: it runs on every call, and contextlib's costs a generator
    and several frames per call."""

    __slots__ = ("code", "method", "metrics", "model", "started", "transport")

    def __init__(self, transport: str, method: str, model: str = "",
                 metrics: ProxyMetrics | None = None) -> None:
        self.transport = transport
        self.method = method
        self.model = model
        self.code = "OK"
        self.metrics = metrics
        self.started = 0.0

    def __enter__(self) -> CallRecord:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Observed once, whichever way the call ended. A code the frontend set before
        raising (e.g. before a gRPC abort) is kept, but for a ProxyError's own."""
        if kind is not None:
            if issubclass(kind, ProxyError):
                self.code = error.code.name  # type: ignore[union-attr]
            elif issubclass(kind, asyncio.CancelledError):  # the client went away
                self.code = "CANCELLED"
            elif issubclass(kind, Exception) and self.code == "OK":
                self.code = "INTERNAL"
        if self.metrics is not None:
            self.metrics.observe_call(self.transport, self.method, self.model, self.code,
                                      time.perf_counter() - self.started)


class _Validating:
    """PredictService.validating(): codec errors become ProxyErrors, and every refusal is
    counted as `invalid`. One per service, reused: it holds no state of a call."""

    __slots__ = ("service",)

    def __init__(self, service: PredictService) -> None:
        self.service = service

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            return
        if issubclass(kind, codec.CodecError):
            self.service.metrics.reject("invalid")
            raise ProxyError.from_codec_error(error) from None  # type: ignore[arg-type]
        if issubclass(kind, ProxyError):
            self.service.metrics.reject("invalid")


def unbatched_request(call: codec.PredictCall) -> bytes:
    """A serialized PredictRequest for a call that did not arrive as one (REST)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.ParseFromString(call.model_spec)
    request.output_filter.extend(call.output_filter)
    for name, tensor in call.inputs.items():
        request.inputs[name].ParseFromString(
            codec.encode_tensor(tensor.dtype, tensor.shape, tensor.data, False))
    return request.SerializeToString()


class PredictService:
    def __init__(self, engine: Engine, metrics: ProxyMetrics | None = None,
                 limits: RequestLimits | None = None) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.limits = limits or RequestLimits()
        self._validating = _Validating(self)

    # -- metrics and errors ----------------------------------------------------------------

    def observe(self, transport: str, method: str, model: str = "") -> CallRecord:
        """Observe one call, as `with service.observe(...) as record:`: its latency and final
        code, once, whichever way it ends (CallRecord.__exit__)."""
        return CallRecord(transport, method, model, self.metrics)

    def validating(self) -> _Validating:
        """A refusal of the call's own content, as `with service.validating():` codec errors
        become ProxyErrors, and every refusal is counted as `invalid`."""
        return self._validating

    def check_limits(self, call: codec.PredictCall) -> None:
        try:
            self.limits.check(call)
        except ProxyError:
            self.metrics.reject("too_large")
            raise

    # -- calls -----------------------------------------------------------------------------

    # predict_bytes() and predict() are plain functions that return the engine's coroutine:
    # a refusal is raised when they are called, and an answer costs no coroutine of their
    # own (two fewer per call on the hottest path). Callers await what they return.

    def predict_bytes(self, request: bytes, timeout: float | None,
                      record: CallRecord | None = None,
                      priority: Priority | None = None) -> Awaitable[bytes]:
        """A serialized PredictRequest (gRPC): decoded, validated and answered."""
        with self.validating():
            call = codec.decode_predict_request(request)
        if record is not None:
            record.model = call.model_name
        return self.predict(call, timeout, request, priority)

    def predict(self, call: codec.PredictCall, timeout: float | None,
                request: bytes | None = None,
                priority: Priority | None = None) -> Awaitable[bytes]:
        """A decoded Predict: batched when it has rows, else forwarded alone, exactly as TFS
        without batching would answer it. `request` is its serialized form when the caller
        has it (else it is encoded from the call, only if needed). `priority`: the one the
        call names; None, its model's default."""
        self.check_limits(call)
        if call.rows <= 0:
            if request is None:
                request = unbatched_request(call)
            return self.engine.forward(PREDICT, request, timeout, model=call.model_name)
        return self.engine.submit(call, timeout, priority)

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes:
        """Any other method, forwarded unchanged; the replica's code and message come back."""
        return await self.engine.forward(path, request, timeout, model=model)
