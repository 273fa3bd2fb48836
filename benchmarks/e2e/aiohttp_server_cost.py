"""aiohttp's two server layers with the same canned handler: a `web.Application` with one
catch-all route (what the proxy's REST frontend used to run on, and what the bare echo
server of `transport_floor.py` runs on) against the low-level `web.Server` (what the
frontend runs on now), 64 REST callers, one-row calls. What the Application's router, match
info, middleware chain and response signal cost a call, apart from everything the proxy
does.

Alternating rounds; the median ratio of the round pairs.

    .venv/bin/python benchmarks/e2e/aiohttp_server_cost.py [--seconds 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web
from harness import (
    ExitStack,
    Measured,
    alternate,
    free_port,
    machine,
    measure,
    ratio_text,
    rest_spec,
    start_process,
)

from batchproxy.bench.echo import canned_rest_predict
from batchproxy.event_loop import run_loop

CONCURRENCY = 64
LAYERS = ("application", "low-level")


async def serve(layer: str, port: int) -> None:
    runner: web.BaseRunner
    if layer == "application":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", canned_rest_predict)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    else:
        runner = web.ServerRunner(web.Server(canned_rest_predict, handler_cancellation=True,
                                             access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until the benchmark stops the process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--serve", choices=LAYERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_loop(serve(args.serve, args.port))
        return
    print(f"# aiohttp's server layers on {machine()}")
    with ExitStack() as stack:
        servers = {}
        for layer in LAYERS:
            port = free_port()
            servers[layer] = (stack.enter_context(start_process(
                [sys.executable, __file__, "--serve", layer, "--port", str(port)], port)), port)

        def run(layer: str) -> Measured:
            process, port = servers[layer]
            spec = rest_spec([f"127.0.0.1:{port}"], concurrency=CONCURRENCY,
                             duration_s=args.seconds, warmup_s=0.5)
            return measure(spec, [process.pid])

        pairs = alternate(args.rounds, lambda: run("application"), lambda: run("low-level"))
    print(f"{'round':>6}{'application us':>16}{'low-level us':>14}")
    for index, (app, low) in enumerate(pairs, 1):
        print(f"{index:>6}{app.server_cpu_us or 0:>16.1f}{low.server_cpu_us or 0:>14.1f}")
    cpu = [(a.server_cpu_us or 0.0, b.server_cpu_us or 0.0) for a, b in pairs]
    print(f"=> low-level / application CPU per request {ratio_text(cpu)}")


if __name__ == "__main__":
    main()
