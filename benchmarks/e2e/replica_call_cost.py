"""The proxy's replica call alone: the CPU one unary Predict costs the calling process, on
`GrpcTransport`'s lean path (grpc.aio's Cython channel) and on grpc.aio's public one, to an
identity replica on loopback, a few calls in flight. What the proxy pays per batch, however
few rows the batch holds: set beside `transport_floor.py`'s bare server (a whole served call)
it bounds how close the proxy's CPU per call can come to the bare server's at a given
number of rows per batch.

Alternating rounds in one process; medians.

    .venv/bin/python benchmarks/e2e/replica_call_cost.py [--calls 3000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Coroutine
from typing import Any

from harness import ExitStack, machine, start_replica

from batchproxy.fleet.transport import GrpcTransport
from batchproxy.methods import PREDICT
from batchproxy.sim.workloads import predict_request

IN_FLIGHT = 4


def cpu_per_call_us(address: str, lean: bool, calls: int) -> float:
    async def main() -> float:
        transport = GrpcTransport(address)
        if not lean:
            transport._lean = None  # every call takes grpc.aio's public path
        request = predict_request("default", 1, 1)

        def call() -> Coroutine[Any, Any, bytes]:
            return transport.call(PREDICT, request, 5.0)

        for _ in range(50):  # the channel connected, the first calls' set-up paid
            await call()

        async def worker() -> None:
            for _ in range(calls // IN_FLIGHT):
                await call()

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        spent = time.process_time() - started
        await transport.close()
        return spent / (calls // IN_FLIGHT * IN_FLIGHT) * 1e6

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(f"# replica call cost on {machine()}")
    lean, public = [], []
    with ExitStack() as stack:
        replica = stack.enter_context(start_replica("identity", model_name="default"))
        for _ in range(args.rounds):
            lean.append(cpu_per_call_us(replica.address, True, args.calls))
            public.append(cpu_per_call_us(replica.address, False, args.calls))
    lean_us, public_us = statistics.median(lean), statistics.median(public)
    print("| path | CPU us per call (median) | rounds |")
    print("|---|---|---|")
    print(f"| lean (default) | {lean_us:.0f} | {', '.join(f'{x:.0f}' for x in lean)} |")
    print(f"| grpc.aio public | {public_us:.0f} | {', '.join(f'{x:.0f}' for x in public)} |")
    print(f"=> lean/public {lean_us / public_us:.2f}x; per row at 2.5 rows a batch "
          f"{lean_us / 2.5:.0f} us, at 15 rows {lean_us / 15:.0f} us")


if __name__ == "__main__":
    main()
