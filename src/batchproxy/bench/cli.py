"""`batchproxy bench`: flags, and the run of one load or a sweep of loads."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from batchproxy import __version__
from batchproxy.bench import payload
from batchproxy.bench.report import ProgressPrinter, table, write_json
from batchproxy.bench.results import RunResult
from batchproxy.bench.runner import run_coroutine, run_load
from batchproxy.bench.signature import SignatureError, fetch_inputs
from batchproxy.bench.spec import DEFAULT_DURATION_S, LoadSpec
from batchproxy.protos import tensor_pb2

DEFAULT_CONCURRENCY = 64
FALLBACK_INPUT = "x"
FALLBACK_ROW_SHAPE = (1,)


def _list_of(kind: Callable[[str], float | int]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"positive numbers, comma-separated: {text!r}")
        return values
    return parse


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes, comma-separated: {text!r}") from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `batchproxy bench`."""
    parser.description = (
        "Load generator for batchproxy or any TensorFlow Serving endpoint: closed loop "
        "(--concurrency callers) or open loop (Poisson --rate), gRPC or REST, bounded by "
        "--duration and/or --requests. A comma list of concurrencies or rates runs a sweep.")
    target = parser.add_argument_group("target")
    target.add_argument("--target", action="append", default=[], metavar="HOST:PORT",
                        help="server to load; repeat for several (calls go round robin). "
                             "Default 127.0.0.1:8500, or :8501 with --protocol rest")
    target.add_argument("--protocol", choices=("grpc", "rest"), default="grpc",
                        help="gRPC Predict, or REST POST /v1/models/NAME:predict "
                             "(default %(default)s)")
    target.add_argument("--model", "--model_name", default="default",
                        help="model name (default %(default)s)")
    target.add_argument("--signature", default="serving_default",
                        help="signature name (default %(default)s)")
    target.add_argument("--input", default=None,
                        help="float input tensor name; with it or --row_shape the signature "
                             "is not read (default: the signature's inputs, else "
                             f"{FALLBACK_INPUT})")
    target.add_argument("--row_shape", "--row-shape", type=_shape, default=None,
                        metavar="D1,D2,...",
                        help="shape of one row after the batch dimension, e.g. 28,28 for the "
                             "demo model (default: from the signature, -1 sizes as 1; else 1)")
    target.add_argument("--rows", type=int, default=1,
                        help="rows (batch dimension) in each request (default %(default)s)")
    target.add_argument("--typed", action="store_true",
                        help="gRPC: send float_val instead of tensor_content")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", "-c", type=_list_of(int), default=None,
                      metavar="N[,N...]",
                      help=f"closed loop: callers in flight (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--rate", "--rates", type=_list_of(float), default=None,
                      metavar="R[,R...]", help="open loop: Poisson arrivals per second")
    load.add_argument("--duration", type=float, default=None, metavar="S",
                      help="seconds measured per run (default "
                           f"{DEFAULT_DURATION_S:g} when --requests is not given)")
    load.add_argument("--requests", "-n", type=int, default=None,
                      help="requests sent per run (the run ends at the first bound reached)")
    load.add_argument("--warmup", type=float, default=0.0, metavar="S",
                      help="seconds of load before measuring (default %(default)s)")
    load.add_argument("--timeout", type=float, default=10.0, metavar="S",
                      help="deadline of each call (default %(default)s)")
    load.add_argument("--processes", type=int, default=1,
                      help="generator processes, each its own event loop; results merged "
                           "(default %(default)s)")
    load.add_argument("--connections", type=int, default=1,
                      help="gRPC connections per target and process; several let a "
                           "--workers proxy share the load (default %(default)s)")
    load.add_argument("--max_outstanding", type=int, default=10_000,
                      help="open loop: calls in flight beyond which arrivals are dropped "
                           "and counted (default %(default)s)")
    load.add_argument("--seed", type=int, default=0, help="open loop arrivals' random seed")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    out.add_argument("--plot", metavar="FILE.png",
                     help="draw latency against offered load (needs matplotlib)")
    out.add_argument("--watch_pid", "--watch-pid", type=int, action="append", default=[],
                     metavar="PID", help="report this process tree's CPU per request "
                                         "(e.g. the proxy's pid); repeatable")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    echo = parser.add_argument_group("echo server (instead of a load)")
    echo.add_argument("--echo_server", "--echo-server", type=int, default=None, metavar="PORT",
                      help="serve a bare gRPC echo (canned PredictResponse) on PORT")
    echo.add_argument("--echo_rest_port", "--echo-rest-port", type=int, default=None,
                      metavar="PORT", help="with --echo_server: a bare REST echo too")
    echo.add_argument("--echo_host", default="127.0.0.1",
                      help="echo server address (default %(default)s)")


def request_inputs(args: argparse.Namespace, target: str
                   ) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{input name: (dtype, row shape)}: from --input/--row_shape when given, else from the
    model's signature; when that cannot be read, one float input x of shape [1] (a bare echo
    server has no signature), said on stderr."""
    if args.input is not None or args.row_shape is not None:
        return {args.input or FALLBACK_INPUT:
                (tensor_pb2.DT_FLOAT, args.row_shape or FALLBACK_ROW_SHAPE)}
    try:
        found = fetch_inputs(target, args.protocol, args.model, args.signature,
                             min(args.timeout, 10.0))
    except SignatureError as err:
        print(f"batchproxy bench: cannot read the signature of model {args.model!r} "
              f"({err}); sending {FALLBACK_INPUT} {list(FALLBACK_ROW_SHAPE)} float",
              file=sys.stderr, flush=True)
        return {FALLBACK_INPUT: (tensor_pb2.DT_FLOAT, FALLBACK_ROW_SHAPE)}
    return {name: (spec.dtype, spec.row_shape) for name, spec in found.items()}


def failure(results: list[RunResult]) -> str | None:
    """Why the bench exits non-zero: a run in which no call was answered."""
    for result in results:
        if result.ok:
            continue
        where = f"{result.spec.mode} {result.spec.offered}"
        if result.first_error:
            return f"every call failed in {where}; the first: {result.first_error}"
        problems = "; ".join(sorted(set(result.connect_problems)))
        return f"no call was answered in {where}" + (f" ({problems})" if problems else "")
    return None


def specs_from_args(args: argparse.Namespace) -> list[LoadSpec]:
    """One LoadSpec per step of the sweep."""
    if args.concurrency and args.rate:
        raise ValueError("--concurrency (closed loop) and --rate (open loop) exclude each other")
    if args.rows <= 0 or args.processes <= 0 or args.connections <= 0:
        raise ValueError("--rows, --processes and --connections must be positive")
    rest = args.protocol == "rest"
    targets = tuple(args.target) or (f"127.0.0.1:{8501 if rest else 8500}",)
    inputs = request_inputs(args, targets[0])
    if rest:
        path = payload.rest_predict_path(args.model)
        body = payload.rest_predict_body_for(inputs, args.rows, signature=args.signature)
    else:
        path = payload.PREDICT_PATH
        body = payload.grpc_predict_body_for(args.model, inputs, args.rows,
                                             signature=args.signature, typed=args.typed)
    duration = args.duration
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION_S
    common = dict(targets=targets, protocol=args.protocol, path=path, body=body, rows=args.rows,
                  duration_s=duration, requests=args.requests, warmup_s=args.warmup,
                  timeout_s=args.timeout, connections=args.connections,
                  max_outstanding=args.max_outstanding, seed=args.seed,
                  use_uvloop=not getattr(args, "no_uvloop", False), model=args.model)
    if args.rate:
        return [LoadSpec(rate=rate, **common) for rate in args.rate]
    return [LoadSpec(concurrency=c, **common)
            for c in (args.concurrency or [DEFAULT_CONCURRENCY])]


def run_sweep(specs: list[LoadSpec], processes: int = 1, watch_pids: list[int] | None = None,
              quiet: bool = False) -> list[RunResult]:
    results = []
    for spec in specs:
        bound = " and ".join(filter(None, [
            f"{spec.duration_s:g}s" if spec.duration_s else "",
            f"{spec.requests:,d} requests" if spec.requests else ""]))
        if not quiet:
            print(f"# {spec.protocol} {spec.mode} loop {spec.offered} -> "
                  f"{', '.join(spec.targets)} for {bound}", file=sys.stderr, flush=True)
        progress = None if quiet else ProgressPrinter(spec.rows)
        results.append(run_load(spec, processes, progress, watch_pids or ()))
    return results


def run_bench(args: argparse.Namespace) -> None:
    """Entry point for parsed arguments."""
    if args.echo_server is not None:
        from batchproxy.bench.echo import serve_echo

        run_coroutine(serve_echo(args.echo_server, args.echo_rest_port, args.echo_host),
                      not getattr(args, "no_uvloop", False))
        return
    try:
        specs = specs_from_args(args)
    except ValueError as err:
        sys.exit(f"batchproxy bench: {err}")
    results = run_sweep(specs, args.processes, args.watch_pid, args.quiet)
    print(table(results), flush=True)
    if args.json:
        write_json(args.json, results, {
            "tool": f"batchproxy bench {__version__}",
            "command": shlex.join(["batchproxy", *sys.argv[1:]])})
    if args.plot:
        from batchproxy.bench.plot import plot_latency

        plot_latency(results, args.plot)
    reason = failure(results)
    if reason is not None:
        sys.exit(f"batchproxy bench: {reason}")
