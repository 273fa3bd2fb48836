"""The transport floor: a gRPC server that answers every Predict with a canned
PredictResponse, and an aiohttp server that answers every POST with canned JSON. They do
nothing else, so the generator can be shown to go well past the proxy, and the proxy's
cost can be put as a ratio to the bare transport's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from aiohttp import web

from batchproxy.bench.payload import CANNED_JSON, canned_predict_response

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
]


def grpc_echo_server(host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with one raw-bytes handler, registered the way the proxy registers
    its own (method_handlers_generic_handler), so the floor pays what the proxy pays."""
    canned = canned_predict_response()

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return canned

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {"Predict": grpc.unary_unary_rpc_method_handler(predict)})])
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound


async def canned_rest_predict(request: web.BaseRequest) -> web.Response:
    """The REST floor's whole handler: the body read (the proxy must read it too), canned
    JSON answered."""
    await request.read()
    return web.Response(body=CANNED_JSON, content_type="application/json")


def rest_echo_app() -> web.Application:
    async def root(request: web.Request) -> web.Response:
        return web.Response(text="batchproxy bench echo server\n")

    app = web.Application()
    app.router.add_post("/{tail:.*}", canned_rest_predict)
    app.router.add_get("/", root)
    return app


async def serve_echo(grpc_port: int, rest_port: int | None = None, host: str = "127.0.0.1",
                     stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or, without one, until SIGINT or SIGTERM."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
    server, bound = grpc_echo_server(host, grpc_port)
    await server.start()
    runner: web.AppRunner | None = None
    if rest_port:
        runner = web.AppRunner(rest_echo_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, rest_port).start()
    log.info("echo server: gRPC on %s:%d%s", host, bound,
             f", REST on {host}:{rest_port}" if rest_port else "")
    try:
        await stop.wait()
    finally:
        await server.stop(0)
        if runner is not None:
            await runner.cleanup()
