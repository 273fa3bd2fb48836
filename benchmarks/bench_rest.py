"""REST predict throughput through batchproxy, against a bare aiohttp handler that only parses
the same JSON and writes the same answer back, measured in the same run (loopback only).

    .venv/bin/python benchmarks/bench_rest.py [--seconds 5] [--concurrency 64] [--record]

Started here, each in its own process: an identity reference replica, a proxy in front of it
(REST port), and the bare server (uvloop + aiohttp + orjson: {"instances": X} in,
{"predictions": X} out, which is exactly what the proxy answers for the identity model).
One client process drives both in turn with `--concurrency` keep-alive connections for
`--seconds` each, `--rounds` times, alternating; each round gives a ratio and the median
ratio is reported (shared machines are noisy: a round pair sees the same neighbours). The ratio
proxy/bare says what the whole proxy path (JSON typing, batching, gRPC to the replica and
back, JSON writing) costs next to the bare minimum an HTTP JSON endpoint costs.
`--record` appends the result to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# --- the bare baseline server --------------------------------------------------------------


def serve_bare(port: int) -> None:
    import orjson
    import uvloop
    from aiohttp import web

    async def predict(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        return web.Response(body=orjson.dumps({"predictions": body["instances"]}),
                            content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/models/{name}:predict", predict)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        await asyncio.Event().wait()

    uvloop.run(main())


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_listening(proc: subprocess.Popen, ports: list[int], log: Path, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            if proc.poll() is not None:
                sys.exit(f"{proc.args} exited:\n{log.read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex((HOST, port)) == 0:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"{proc.args} not listening on {port}:\n{log.read_text()}")
            time.sleep(0.05)


@contextlib.contextmanager
def spawn(args: list[str], ports: list[int], logs: Path):
    log = logs / f"{len(list(logs.iterdir()))}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_listening(proc, ports, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the load ------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    requests: int  # answered 200 with the expected JSON
    seconds: float
    latencies: list[float]
    errors: int = 0  # other answers (counted, not timed)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


async def drive(name: str, url: str, body: bytes, expected: object, concurrency: int,
                seconds: float, warmup: int = 200) -> Result:
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        errors: list[bytes] = []

        async def one() -> float | None:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
            if response.status != 200:
                if not errors:
                    print(f"  {name}: HTTP {response.status}: {payload[:200]!r}", flush=True)
                errors.append(payload)
                return None
            return time.perf_counter() - started

        async with session.post(url, data=body, headers=headers) as response:
            answer = json.loads(await response.read())
        if answer != expected:
            raise RuntimeError(f"{name} answered {str(answer)[:200]}, not the expected JSON")
        await asyncio.gather(*(one() for _ in range(warmup)))

        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                latency = await one()
                if latency is not None:
                    latencies.append(latency)

        errors.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Result(name, len(latencies), elapsed, latencies, len(errors))


def payload(rows: int, cols: int) -> tuple[bytes, dict]:
    # Multiples of 1/4: exact in float32, so the proxy's float32 output is textually the
    # bare server's float64 output.
    instances = [[((r * cols + c) % 64) / 4 for c in range(cols)] for r in range(rows)]
    return json.dumps({"instances": instances}).encode(), {"predictions": instances}


def record(text: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nEvery figure is a ratio against a baseline "
                        "measured in the same run on the same machine.\n")
    with path.open("a") as out:
        out.write("\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--cols", type=int, default=64, help="floats per row")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_timeout_micros", type=int, default=1000)
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return

    body, expected = payload(args.rows, args.cols)
    load = os.getloadavg()[0]  # other work on the machine skews both sides
    python = sys.executable
    replica_port, replica_rest, proxy_port, proxy_rest, bare_port = (
        free_port() for _ in range(5))
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        logs = Path(tmp)
        replica = [python, "-m", "batchproxy.replica", "--host", HOST, "--port",
                   str(replica_port), "--rest_api_port", str(replica_rest), "--model",
                   "identity"]
        proxy = [python, "-m", "batchproxy", "--log_level", "WARNING", "serve", "--host", HOST,
                 "--port", str(proxy_port), "--rest_api_port", str(proxy_rest), "--replica",
                 f"{HOST}:{replica_port}", "--max_batch_size", str(args.max_batch_size),
                 "--batch_timeout_micros", str(args.batch_timeout_micros),
                 # A starved replica (busy machine) must not be ejected mid-run.
                 "--health_interval_ms", "5000", "--eject_after_failures", "1000"]
        bare = [python, str(Path(__file__).resolve()), "--serve-bare", str(bare_port)]
        with (spawn(replica, [replica_port], logs), spawn(proxy, [proxy_port, proxy_rest], logs),
              spawn(bare, [bare_port], logs)):
            targets = {
                "bare aiohttp": f"http://{HOST}:{bare_port}/v1/models/identity:predict",
                "batchproxy": f"http://{HOST}:{proxy_rest}/v1/models/identity:predict",
            }
            rounds: list[dict[str, Result]] = []
            for round_ in range(args.rounds):
                results = {}
                for name, url in targets.items():
                    result = asyncio.run(drive(name, url, body, expected, args.concurrency,
                                               args.seconds))
                    print(f"round {round_ + 1} {name:13s} {result.rate:9.0f} req/s  "
                          f"p50 {result.percentile(0.5):6.2f} ms  "
                          f"p99 {result.percentile(0.99):6.2f} ms  "
                          f"errors {result.errors}", flush=True)
                    results[name] = result
                rounds.append(results)
    ratios = [r["batchproxy"].rate / r["bare aiohttp"].rate for r in rounds]
    ratio = statistics.median(ratios)
    # The round whose ratio is the median one (the lower middle for an even count).
    middle = rounds[sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]]
    command = (".venv/bin/python benchmarks/bench_rest.py "
               f"--seconds {args.seconds:g} --rounds {args.rounds} "
               f"--concurrency {args.concurrency} --rows {args.rows} --cols {args.cols}")
    lines = [
        f"## REST predict: batchproxy vs a bare aiohttp JSON handler ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{command}`",
        "",
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, loopback; "
        f"{args.rows} row(s) x {args.cols} floats per request, {args.concurrency} "
        f"connections, {args.rounds} alternating rounds of {args.seconds:g} s each (the table "
        f"shows the median round); proxy in front of "
        f"one identity reference replica (max_batch_size {args.max_batch_size}, "
        f"batch_timeout_micros {args.batch_timeout_micros}). Client, proxy, replica and bare "
        "server share the machine.",
        "",
        "| target | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r.name} | {r.rate:.0f} | {r.percentile(0.5):.2f} | {r.percentile(0.99):.2f} "
          f"| {r.errors} |" for r in middle.values()),
        "",
        f"**Ratio batchproxy / bare: {ratio:.2f}** (median of the rounds' ratios "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; load average before the run "
        f"{load:.1f})",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
