"""`batchproxy bench`: a load generator for batchproxy or any TensorFlow Serving endpoint,
and the bare echo servers that give the transport floor.

    batchproxy bench --target 127.0.0.1:8500 --concurrency 64 --duration 10
    batchproxy bench --protocol rest --target 127.0.0.1:8501 --rate 100,200,400 --plot p.png
    batchproxy bench --echo_server 9500 --echo_rest_port 9501

From Python: build a LoadSpec (payload.* prepares the body) and call run_load().
"""

from __future__ import annotations

from batchproxy.bench.cli import add_bench_arguments, run_bench, run_sweep, specs_from_args
from batchproxy.bench.echo import grpc_echo_server, rest_echo_app, serve_echo
from batchproxy.bench.results import RunResult, WorkerResult
from batchproxy.bench.runner import run_load, run_load_async
from batchproxy.bench.spec import LoadSpec

__all__ = [
    "LoadSpec",
    "RunResult",
    "WorkerResult",
    "add_bench_arguments",
    "grpc_echo_server",
    "rest_echo_app",
    "run_bench",
    "run_load",
    "run_load_async",
    "run_sweep",
    "serve_echo",
    "specs_from_args",
]
