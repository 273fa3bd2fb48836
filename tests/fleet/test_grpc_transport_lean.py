"""GrpcTransport's calls on the Cython channel answer exactly as grpc.aio's public calls do:
the same bytes, codes and messages, deadlines, cancellation (the replica hears of it) and
channel close. Each case runs on both paths against one in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from batchproxy.errors import ProxyError
from batchproxy.fleet.transport import GrpcTransport

SERVICE = "test.Echo"


class Replica:
    def __init__(self) -> None:
        self.cancelled = 0
        self.started = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such model " + request.decode())
        raise AssertionError("abort raises")

    async def empty(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "")
        raise AssertionError("abort raises")

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b""


@pytest.fixture
async def replica() -> AsyncIterator[tuple[Replica, str]]:
    state = Replica()
    server = grpc.aio.server()
    table = {name: grpc.unary_unary_rpc_method_handler(getattr(state, name))
             for name in ("echo", "fail", "empty", "hang")}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, table)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield state, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def transport(address: str, lean: bool) -> GrpcTransport:
    made = GrpcTransport(address)
    if not lean:
        made._lean = None  # the public grpc.aio path
    else:
        assert made._lean is not None, "this grpcio should have the Cython channel"
    return made


@pytest.fixture(params=[True, False], ids=["lean", "public"])
def lean(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_answer_and_errors(replica: tuple[Replica, str], lean: bool) -> None:
    _, address = replica
    t = transport(address, lean)
    try:
        assert await t.call(f"/{SERVICE}/echo", b"abc", 5.0) == b"echo:abc"
        with pytest.raises(ProxyError) as err:
            await t.call(f"/{SERVICE}/fail", b"m", 5.0)
        assert (err.value.code, err.value.message) == (grpc.StatusCode.NOT_FOUND,
                                                       "no such model m")
        with pytest.raises(ProxyError) as err:  # no details: the code's name
            await t.call(f"/{SERVICE}/empty", b"", 5.0)
        assert (err.value.code, err.value.message) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                       "FAILED_PRECONDITION")
        with pytest.raises(ProxyError) as err:
            await t.call(f"/{SERVICE}/missing", b"", 5.0)
        assert err.value.code is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await t.close()


async def test_deadline(replica: tuple[Replica, str], lean: bool) -> None:
    _, address = replica
    t = transport(address, lean)
    try:
        with pytest.raises(ProxyError) as err:
            await t.call(f"/{SERVICE}/hang", b"", 0.2)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await t.close()


async def hanging(t: GrpcTransport, state: Replica) -> asyncio.Task[bytes]:
    """A call to the method that never answers, once the replica has it."""
    task = asyncio.ensure_future(t.call(f"/{SERVICE}/hang", b"", 10.0))
    await asyncio.wait_for(state.started.wait(), 5)
    return task


async def test_cancelled_caller_cancels_the_call(replica: tuple[Replica, str],
                                                 lean: bool) -> None:
    state, address = replica
    t = transport(address, lean)
    try:
        task = await hanging(t, state)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the replica hears of it
            if state.cancelled:
                break
            await asyncio.sleep(0.02)
        assert state.cancelled == 1
        if lean:
            assert t._lean is not None and not t._lean._inflight
    finally:
        await t.close()


async def test_close_cancels_calls_in_flight(replica: tuple[Replica, str],
                                             lean: bool) -> None:
    state, address = replica
    t = transport(address, lean)
    task = await hanging(t, state)
    await asyncio.wait_for(t.close(), 5)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_a_cython_channel_of_another_signature_falls_back_to_the_public_path(
        replica: tuple[Replica, str]) -> None:
    _, address = replica
    t = transport(address, lean=True)
    assert t._lean is not None
    real = t._lean._channel

    class OtherSignature:
        def call(self, method: bytes, deadline: float | None, credentials: object,
                 wait_for_ready: object) -> object:  # one argument fewer
            return real.call(method, deadline, credentials, wait_for_ready, 0)

    t._lean._channel = OtherSignature()
    try:
        assert await t.call(f"/{SERVICE}/echo", b"x", 5.0) == b"echo:x"
        assert not t._lean.usable
        assert await t.call(f"/{SERVICE}/echo", b"y", 5.0) == b"echo:y"
    finally:
        await t.close()
