"""Event loop: the proxy on uvloop (the default) against asyncio's own loop
(`serve --no_uvloop`), one-row calls at saturation to two identity replicas, over gRPC and
over REST. Reports throughput and the proxy's CPU per request, asyncio as a ratio to uvloop,
alternating rounds.

    .venv/bin/python benchmarks/e2e/event_loop.py [--seconds 3.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from harness import (
    ExitStack,
    Measured,
    alternate,
    fmt,
    grpc_spec,
    machine,
    measure,
    ratio_text,
    rest_spec,
    start_proxy,
    start_replica,
    timed,
)

CONCURRENCY = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with ExitStack() as stack:
        replicas = [stack.enter_context(start_replica("identity", model_name="default"))
                    for _ in range(2)]
        proxies = {
            "uvloop": stack.enter_context(start_proxy(replicas)),
            "asyncio": stack.enter_context(start_proxy(replicas, no_uvloop=True)),
        }

        def run(loop: str, transport: str) -> Callable[[], Measured]:
            proxy = proxies[loop]
            make = grpc_spec if transport == "grpc" else rest_spec
            target = proxy.address if transport == "grpc" else f"127.0.0.1:{proxy.rest_port}"

            def once() -> Measured:
                return measure(make([target], concurrency=CONCURRENCY, duration_s=args.seconds,
                                    warmup_s=args.warmup),
                               [proxy.pid], [r.pid for r in replicas])

            return once

        for transport in ("grpc", "rest"):
            with timed(transport):
                pairs = alternate(args.rounds, run("uvloop", transport),
                                  run("asyncio", transport))
            print(f"\n{transport}: {len(pairs)} round pair(s), closed loop c={CONCURRENCY}")
            print(f"  {'':14}{'req/s':>9}{'proxy us/req':>14}{'p50 ms':>8}{'p99 ms':>8}")
            for index, (uv, aio) in enumerate(pairs):
                for label, m in (("uvloop", uv), ("asyncio", aio)):
                    print(f"  {label + ' #' + str(index + 1):14}{fmt(m.rps):>9}"
                          f"{fmt(m.server_cpu_us):>14}{fmt(m.p50, '.2f'):>8}"
                          f"{fmt(m.p99, '.2f'):>8}")
            rps = ratio_text([(a.rps, b.rps) for a, b in pairs])
            cpu = ratio_text([(a.server_cpu_us or 0, b.server_cpu_us or 0) for a, b in pairs])
            print(f"  => asyncio / uvloop throughput {rps}")
            print(f"  => asyncio / uvloop proxy CPU per request {cpu}")


if __name__ == "__main__":
    main()
