"""The two transports of the generator. `call()` sends the prepared body once and returns
None for an answer, else the error's name (a gRPC status code name, HTTP_<status>, or the
exception's class): an error is a result to count, never a reason to stop. Each client
keeps the first error's code and message (`first_error`): a run where every call fails says
why."""

from __future__ import annotations

import asyncio
import itertools
from typing import Protocol

import aiohttp
import grpc
from yarl import URL

from batchproxy.bench.spec import LoadSpec

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Without it, channels to one target share one subchannel (one TCP connection) process
    # wide, and --connections would open nothing new: a proxy with --workers N would see all
    # the load on one worker, since SO_REUSEPORT spreads connections, not calls.
    ("grpc.use_local_subchannel_pool", 1),
]


class Client(Protocol):
    first_error: str | None

    async def connect(self, timeout_s: float) -> list[str]: ...
    async def call(self) -> str | None: ...
    async def close(self) -> None: ...


class GrpcClient:
    """Raw bytes over grpc.aio: no serializer runs, the answer is not parsed."""

    def __init__(self, spec: LoadSpec) -> None:
        self.body = spec.body
        self.timeout_s = spec.timeout_s
        self.first_error: str | None = None
        self.channels = [grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
                         for target in spec.targets for _ in range(max(spec.connections, 1))]
        # Round robin over the channels, call by call (so over the targets too).
        methods = [channel.unary_unary(spec.path) for channel in self.channels]
        self._next = itertools.cycle(methods).__next__

    async def connect(self, timeout_s: float) -> list[str]:
        """Open every connection before the clock starts; returns the problems."""
        problems = []
        for channel in self.channels:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout_s)
            except TimeoutError:
                problems.append(f"not connected after {timeout_s:g}s")
        return problems

    async def call(self) -> str | None:
        try:
            await self._next()(self.body, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            if self.first_error is None:
                self.first_error = f"{err.code().name}: {err.details()}"
            return err.code().name
        except Exception as err:  # counted and shown, not raised: the run goes on
            if self.first_error is None:
                self.first_error = f"{type(err).__name__}: {err}"
            return type(err).__name__
        return None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class RestClient:
    """One aiohttp session with a keep-alive pool as large as the calls in flight, so each
    connection carries one call at a time (HTTP/1.1 has no multiplexing)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.body = spec.body
        self.first_error: str | None = None
        self.urls = [URL(f"http://{target}{spec.path}") for target in spec.targets]
        self._next = itertools.cycle(self.urls).__next__
        limit = spec.concurrency or spec.max_outstanding
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0,
                                           force_close=False),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
            skip_auto_headers=("User-Agent",),
        )

    async def connect(self, timeout_s: float) -> list[str]:
        problems = []
        for url in self.urls:
            try:
                async with self.session.get(url.with_path("/"),
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)):
                    pass
            except (aiohttp.ClientError, TimeoutError) as err:
                problems.append(f"{url.host}:{url.port}: {type(err).__name__} {err}")
        return problems

    async def call(self) -> str | None:
        try:
            async with self.session.post(self._next(), data=self.body) as response:
                answer = await response.read()
                if response.status != 200:
                    code = f"HTTP_{response.status}"
                    if self.first_error is None:
                        self.first_error = f"{code}: {answer[:1024].decode(errors='replace')}"
                    return code
        except TimeoutError:
            return self._failed("TIMEOUT", "no answer within the call's timeout")
        except aiohttp.ClientConnectionError as err:
            return self._failed("CONNECTION_ERROR", str(err))
        except Exception as err:  # counted and shown, not raised: the run goes on
            return self._failed(type(err).__name__, str(err))
        return None

    def _failed(self, code: str, message: str) -> str:
        if self.first_error is None:
            self.first_error = f"{code}: {message}"
        return code

    async def close(self) -> None:
        await self.session.close()


def make_client(spec: LoadSpec) -> Client:
    return GrpcClient(spec) if spec.protocol == "grpc" else RestClient(spec)
