"""batchproxy's reference replica: a small TensorFlow Serving stand-in for development,
tests and benchmarks, where no TFS can run. NOT for production traffic.

It serves TFS's gRPC API (Predict, GetModelMetadata, GetModelStatus, and Classify and
Regress for models that define them; the rest answer UNIMPLEMENTED) with TFS's status codes
and messages, plus REST model status/metadata and Prometheus metrics on --rest_api_port.
Models: `identity` (y = x), `demo` (an MNIST-shaped digit classifier) and `multi` (strings,
several outputs and signatures, other dtypes, Classify and Regress), any of them optionally
behind a cost model (batch_cost_ms + rows x row_cost_us per Predict, one Predict at a time,
as a GPU runs batches).

    python -m batchproxy.replica --port 8500 --rest_api_port 8501 --model demo
    batchproxy replica --model identity --batch_cost_ms 5 --row_cost_us 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from batchproxy.event_loop import run_loop
from batchproxy.flags import batch_sizes
from batchproxy.replica.models import MODELS
from batchproxy.replica.server import Replica
from batchproxy.replica.versions import VersionPolicy

__all__ = ["Replica", "add_replica_arguments", "run_replica", "serve_replica"]


async def serve_replica(
    port: int = 8500,
    rest_api_port: int | None = 8501,
    model_name: str | None = None,
    model_kind: str = "identity",
    batch_cost_ms: float = 0.0,
    row_cost_us: float = 0.0,
    *,
    model_version: int = 1,
    tensor_content: bool = False,
    check_numerics: bool = False,
    ssl_config_file: str | None = None,
    host: str = "0.0.0.0",
    model_base_path: str | None = None,
    file_system_poll_wait_seconds: float = 1.0,
    model_version_policy: str = "latest",
    stop: asyncio.Event | None = None,
    allowed_batch_sizes: tuple[int, ...] = (),
) -> None:
    """Serve until `stop` is set or, without one, until SIGINT or SIGTERM."""
    replica = Replica(
        port=port,
        rest_api_port=rest_api_port,
        model_name=model_name,
        model_kind=model_kind,
        model_version=model_version,
        batch_cost_ms=batch_cost_ms,
        row_cost_us=row_cost_us,
        tensor_content=tensor_content,
        check_numerics=check_numerics,
        ssl_config_file=ssl_config_file,
        host=host,
        model_base_path=model_base_path,
        file_system_poll_wait_seconds=file_system_poll_wait_seconds,
        model_version_policy=model_version_policy,
    )
    # As a compiled model (TensorRT, XLA): a batch of any other size is refused.
    replica.service.allowed_batch_sizes = allowed_batch_sizes
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not possible off the main thread or on Windows: then only `stop` ends it.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
    await replica.start()
    try:
        await stop.wait()
    finally:
        await replica.stop()
        logging.getLogger(__name__).info("reference replica stopped")


def _version_policy(text: str) -> str:
    try:
        VersionPolicy.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `batchproxy replica` and `python -m batchproxy.replica`, named like
    TFS's own where they exist."""
    parser.add_argument("--port", type=int, default=8500,
                        help="gRPC port (0: any free port) (default %(default)s)")
    parser.add_argument("--rest_api_port", type=int, default=8501,
                        help="REST and metrics port, 0 disables it (default %(default)s)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--model", default="identity",
                        choices=sorted(MODELS), help="model to serve (default %(default)s)")
    parser.add_argument("--model_name", default=None,
                        help="name clients use for the model (default: the --model kind)")
    parser.add_argument("--model_version", type=int, default=1,
                        help="version served without --model_base_path (default %(default)s)")
    parser.add_argument("--model_base_path", default=None, metavar="DIR",
                        help="serve the versions under DIR as TFS does: numbered folders "
                             "(1/, 0002/) each with a replica.json naming the model and its "
                             "options (keys it leaves out come from --model, --batch_cost_ms, "
                             "--row_cost_us); DIR/labels.json maps version labels")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="seconds between polls of --model_base_path; 0 polls once "
                             "(default %(default)s)")
    parser.add_argument("--model_version_policy", default="latest", type=_version_policy,
                        help="versions of --model_base_path served: latest (TFS's default: "
                             "the highest), latest:N, all, or specific:V1,V2 "
                             "(default %(default)s)")
    parser.add_argument("--batch_cost_ms", type=float, default=0.0,
                        help="simulated time per Predict call (default %(default)s)")
    parser.add_argument("--row_cost_us", type=float, default=0.0,
                        help="simulated time per row of a Predict call (default %(default)s)")
    parser.add_argument("--enable_serialization_as_tensor_content", action="store_true",
                        help="answer with tensor_content instead of typed fields, like TFS's "
                             "flag of the same name")
    parser.add_argument("--ssl_config_file", default=None,
                        help="TFS-format SSLConfig text file: TLS (or mutual TLS with "
                             "client_verify) on the gRPC port")
    parser.add_argument("--check_numerics", action="store_true",
                        help="fail a Predict whose float inputs hold NaN or Inf with "
                             "INVALID_ARGUMENT, as a model with tf.debugging.check_numerics "
                             "does: one such row fails its whole batch")
    parser.add_argument("--allowed_batch_sizes", type=batch_sizes, default=(),
                        metavar="N,N,...",
                        help="refuse a Predict whose batch is of any other size with "
                             "INVALID_ARGUMENT, as a model compiled for these sizes does "
                             "(default: any size)")


def run_replica(args: argparse.Namespace) -> None:
    """Entry point for parsed arguments (uvloop unless args.no_uvloop)."""
    main = serve_replica(
        port=args.port,
        rest_api_port=args.rest_api_port or None,
        model_name=args.model_name,
        model_kind=args.model,
        batch_cost_ms=args.batch_cost_ms,
        row_cost_us=args.row_cost_us,
        model_version=args.model_version,
        tensor_content=args.enable_serialization_as_tensor_content,
        check_numerics=args.check_numerics,
        ssl_config_file=args.ssl_config_file,
        host=args.host,
        model_base_path=args.model_base_path,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_version_policy=args.model_version_policy,
        allowed_batch_sizes=args.allowed_batch_sizes,
    )
    run_loop(main, not getattr(args, "no_uvloop", False))
