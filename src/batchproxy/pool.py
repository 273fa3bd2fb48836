"""The replicas behind the proxy: channels, in-flight accounting and the choice of replica.

Batches go to the replica with the fewest outstanding batches; each replica takes at most
`max_inflight` batches at once, so while all are busy the batcher waits here and its open
batch keeps filling. Calls travel as raw bytes: nothing is parsed on the way through."""

from __future__ import annotations

import asyncio
import collections
import logging

import grpc

from batchproxy.errors import ProxyError

log = logging.getLogger(__name__)

PREDICT = "/tensorflow.serving.PredictionService/Predict"

# TFS allows INT32_MAX both ways; a merged batch can be far larger than any single call.
UNLIMITED_MESSAGES = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class Replica:
    __slots__ = ("_calls", "address", "channel", "outstanding")

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=UNLIMITED_MESSAGES)
        self.outstanding = 0
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def method(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes callable for `path` (no serializers: bytes in, bytes out)."""
        call = self._calls.get(path)
        if call is None:
            call = self._calls[path] = self.channel.unary_unary(path)
        return call

    def __repr__(self) -> str:
        return f"Replica({self.address}, outstanding={self.outstanding})"


class ReplicaPool:
    def __init__(self, addresses: list[str] | tuple[str, ...], max_inflight: int = 2,
                 default_timeout_s: float = 30.0) -> None:
        if not addresses:
            raise ValueError("the pool needs at least one replica")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.replicas = [Replica(address) for address in addresses]
        self.max_inflight = max_inflight
        self.default_timeout_s = default_timeout_s
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _least_loaded(self) -> Replica | None:
        best: Replica | None = None
        for replica in self.replicas:
            if replica.outstanding < self.max_inflight and (
                best is None or replica.outstanding < best.outstanding
            ):
                best = replica
        return best

    async def acquire(self) -> Replica:
        """Reserve an in-flight slot on the least-loaded replica, waiting while all are full."""
        while True:
            replica = self._least_loaded()
            if replica is not None:
                replica.outstanding += 1
                return replica
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Pass a wake-up we may have taken on to the next waiter.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout_s if timeout is None else timeout

    async def predict(self, replica: Replica, request: bytes, timeout: float | None) -> bytes:
        """One merged batch to `replica`; the caller holds a slot from acquire()."""
        try:
            return await replica.method(PREDICT)(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as err:
            raise ProxyError.from_rpc_error(err) from None

    async def forward(self, path: str, request: bytes, timeout: float | None) -> bytes:
        """An unbatched call (metadata, status, classify, ...) to the least-busy replica.

        These calls take no batch slot: they are small and must not wait behind batches."""
        replica = min(self.replicas, key=lambda r: r.outstanding)
        try:
            return await replica.method(path)(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as err:
            raise ProxyError.from_rpc_error(err) from None

    async def close(self) -> None:
        await asyncio.gather(*(replica.channel.close() for replica in self.replicas))
