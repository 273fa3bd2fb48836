"""How the fleet reaches one replica: a `Transport` sends raw request bytes to a method path
and returns raw response bytes, raising `ProxyError` for any failure. The proxy uses gRPC
channels; the simulator plugs in simulated replicas through the same interface."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import grpc

try:  # private modules: where a grpcio lacks them, every call takes the public path
    from grpc import _common as _grpc_common
    from grpc._cython import cygrpc as _cygrpc
except ImportError:  # pragma: no cover - this grpcio has them
    _grpc_common = _cygrpc = None

from batchproxy.errors import ProxyError

# TFS allows INT32_MAX both ways; a merged batch can be far larger than any single call.
UNLIMITED_MESSAGES = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class Transport(Protocol):
    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        """One unary call; raises ProxyError with the replica's status on failure."""
        ...

    async def close(self) -> None: ...


class TransportFactory(Protocol):
    def __call__(self, address: str) -> Transport: ...


def channel_options(reconnect_backoff_ms: int) -> list[tuple[str, int]]:
    # gRPC's reconnect back-off grows to 120 s by default: a restarted replica would stay
    # unreachable long after it is back. Cap it near the health-check period instead.
    return [
        *UNLIMITED_MESSAGES,
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
    ]


class GrpcTransport:
    """A gRPC channel to one replica; calls travel as raw bytes (no serializers).

    A call is made on grpc.aio's Cython channel directly (see _LeanCalls) where this grpcio
    has it: the public `UnaryUnaryMultiCallable` wraps each call in a Task, a call object and
    a weak reference, 2-3 % of the proxy's CPU under load, besides the Task's own step
    (benchmarks/RESULTS.md, "gRPC cost per call")."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 reconnect_backoff_ms: int = 1000) -> None:
        options = channel_options(reconnect_backoff_ms)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._lean = _LeanCalls.of(self.channel, self._public_call)

    def call(self, path: str, request: bytes, timeout: float) -> Coroutine[Any, Any, bytes]:
        # The call's own coroutine, no wrapper of this method's: callers await it.
        if self._lean is not None and self._lean.usable:
            return self._lean.call(path, request, timeout)
        return self._public_call(path, request, timeout)

    async def _public_call(self, path: str, request: bytes, timeout: float) -> bytes:
        method = self._calls.get(path)
        if method is None:
            method = self._calls[path] = self.channel.unary_unary(path)
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise ProxyError.from_rpc_error(err) from None

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.cancel_all()
        await self.channel.close()


# What grpc.aio's own call says when the application cancels it.
_CANCELLED_DETAILS = "Locally cancelled by application!"


class _LeanCalls:
    """Unary calls on a grpc.aio channel's Cython channel, as grpc.aio's UnaryUnaryCall
    makes them (the same deadline, no metadata, no call credentials, the same cancellation
    and the same status), in the caller's own coroutine: no Task, call object or weak set
    per call. Calls in flight are kept so that closing cancels them first, as closing a
    grpc.aio channel cancels its own calls."""

    def __init__(self, cython_channel: Any, codes: dict[Any, grpc.StatusCode],
                 public: Callable[[str, bytes, float], Coroutine[Any, Any, bytes]]) -> None:
        self._channel = cython_channel
        self._codes = codes
        self._public = public
        self._methods: dict[str, bytes] = {}
        self._inflight: set[Any] = set()
        self.usable = True

    @classmethod
    def of(cls, channel: grpc.aio.Channel,
           public: Callable[[str, bytes, float], Coroutine[Any, Any, bytes]]
           ) -> _LeanCalls | None:
        """None where this grpcio's internals are not the ones this was written against:
        calls then take the public path (`public`). A grpcio whose Cython channel takes
        other arguments is found out on the first call, before anything is sent, and
        every call from then on takes the public path too."""
        cython_channel = getattr(channel, "_channel", None)
        codes = getattr(_grpc_common, "CYGRPC_STATUS_CODE_TO_STATUS_CODE", None)
        if not callable(getattr(cython_channel, "call", None)) or not isinstance(codes, dict):
            return None
        aio_call = getattr(_cygrpc, "_AioCall", None)
        if aio_call is None or not all(hasattr(aio_call, name) for name in _AIO_CALL_API):
            return None
        return cls(cython_channel, codes, public)

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if not self.usable:
            return await self._public(path, request, timeout)
        method = self._methods.get(path)
        if method is None:
            method = self._methods[path] = path.encode()
        deadline = None if timeout is None else time.time() + timeout
        try:
            # (method, deadline, call credentials, wait_for_ready, registered call handle)
            call = self._channel.call(method, deadline, None, None, 0)
        except TypeError:
            # Another grpcio's signature: nothing was sent yet, so the public path is safe.
            self.usable = False
            return await self._public(path, request, timeout)
        inflight = self._inflight
        inflight.add(call)
        try:
            response = await call.unary_unary(request, (), None)
        except BaseException:  # cancelled, or closed unfinished: the call goes too
            if not call.done():
                call.cancel(_CANCELLED_DETAILS)
            raise
        finally:
            inflight.discard(call)
        if call.is_ok():
            return response
        if call.is_locally_cancelled():
            raise asyncio.CancelledError()
        status = call._status
        code = self._codes[status.code()]
        raise ProxyError(code, status.details() or code.name)

    def cancel_all(self) -> None:
        for call in list(self._inflight):
            if not call.done():
                call.cancel(_CANCELLED_DETAILS)


_AIO_CALL_API = ("unary_unary", "is_ok", "is_locally_cancelled", "done", "cancel", "_status")


def grpc_transports(credentials: grpc.ChannelCredentials | None = None,
                    reconnect_backoff_ms: int = 1000) -> TransportFactory:
    def make(address: str) -> Transport:
        return GrpcTransport(address, credentials, reconnect_backoff_ms)
    return make
