"""How the fleet reaches one replica: a `Transport` sends raw request bytes to a method path
and returns raw response bytes, raising `ProxyError` for any failure. The proxy uses gRPC
channels; the simulator plugs in simulated replicas through the same interface."""

from __future__ import annotations

from typing import Protocol

import grpc

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
    """A gRPC channel to one replica; calls travel as raw bytes (no serializers)."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 reconnect_backoff_ms: int = 1000) -> None:
        options = channel_options(reconnect_backoff_ms)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        method = self._calls.get(path)
        if method is None:
            method = self._calls[path] = self.channel.unary_unary(path)
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise ProxyError.from_rpc_error(err) from None

    async def close(self) -> None:
        await self.channel.close()


def grpc_transports(credentials: grpc.ChannelCredentials | None = None,
                    reconnect_backoff_ms: int = 1000) -> TransportFactory:
    def make(address: str) -> Transport:
        return GrpcTransport(address, credentials, reconnect_backoff_ms)
    return make
