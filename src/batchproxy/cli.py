"""`batchproxy serve | replica | bench | simulate`: the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from batchproxy import __version__
from batchproxy.config import BatchingConfig, ProxyConfig
from batchproxy.engine.policy import POLICIES
from batchproxy.flags import (
    BATCHING_FLAGS,
    add_batching_flags,
    add_replica_flags,
    batching_settings,
)
from batchproxy.logs import setup_logging


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProxyConfig()
    batching = BatchingConfig()
    net = parser.add_argument_group("network")
    net.add_argument("--port", type=int, default=defaults.port,
                     help="gRPC port, where TFS clients connect (default %(default)s)")
    net.add_argument("--rest_api_port", type=int, default=defaults.rest_api_port,
                     help="REST port (default %(default)s)")
    net.add_argument("--host", default=defaults.host,
                     help="address to listen on (default %(default)s)")
    net.add_argument("--rest_max_body_bytes", type=int, default=defaults.rest_max_body_bytes,
                     help="largest REST request body in bytes, after gzip decompression; "
                          "larger ones get HTTP 413 (default %(default)s)")
    up = parser.add_argument_group("replicas")
    up.add_argument("--replica", action="append", default=[], metavar="HOST:PORT",
                    help="a TFS replica's gRPC address; repeat for several. Without any, "
                         "--local_replicas reference replicas are started")
    up.add_argument("--local_replicas", type=int, default=defaults.local_replicas,
                    help="reference replicas to start when no --replica is given "
                         "(default %(default)s)")
    up.add_argument("--local_replica_model", default=defaults.local_replica_model,
                    choices=["demo", "identity"],
                    help="model the local replicas serve (default %(default)s)")
    up.add_argument("--model_name", default=defaults.model_name,
                    help="model name the local replicas serve (default %(default)s)")
    add_replica_flags(up)
    up.add_argument("--replicas_dns", action="append", default=[], metavar="NAME:PORT",
                    help="every address NAME resolves to is a replica (a Kubernetes headless "
                         "Service); re-resolved every --dns_refresh_s; repeatable")
    up.add_argument("--dns_refresh_s", type=float, default=defaults.dns_refresh_s,
                    help="seconds between DNS re-resolutions (default %(default)s)")
    up.add_argument("--dns_server", default=None, metavar="HOST:PORT",
                    help="ask this DNS server instead of the system resolver")
    up.add_argument("--health_check_model", action="append", default=[], metavar="NAME",
                    help="model to health-check from the start (models seen in traffic "
                         "are checked too); repeatable")
    parser.add_argument("--monitoring_port", type=int, default=0,
                        help="also serve /metrics (and /monitoring/prometheus/metrics), "
                             "/healthz and /readyz on this port; the REST port serves them "
                             "too (default 0: off)")
    parser.add_argument("--monitoring_host", default=defaults.monitoring_host,
                        help="address of --monitoring_port (default %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes sharing the ports (SO_REUSEPORT); metrics cover all "
                             "(default %(default)s)")
    lim = parser.add_argument_group("limits and security")
    lim.add_argument("--max_message_bytes", type=int, default=defaults.max_message_bytes,
                     help="largest gRPC message accepted (default %(default)s)")
    lim.add_argument("--max_rows_per_request", type=int,
                     default=defaults.max_rows_per_request,
                     help="rows (dimension 0) one call may carry (default %(default)s)")
    lim.add_argument("--max_rank", type=int, default=defaults.max_rank,
                     help="dimensions one input tensor may have (default %(default)s; TF "
                          "itself stops at 254)")
    lim.add_argument("--ssl_config_file", default=None,
                     help="TFS-format SSLConfig text file (server_key, server_cert, custom_ca, "
                          "client_verify): TLS on the gRPC and REST ports")
    lim.add_argument("--replica_ca", default=None,
                     help="PEM CA file: talk TLS to replicas and check their certificates")
    lim.add_argument("--replica_cert", default=None,
                     help="PEM client certificate for mutual TLS to replicas")
    lim.add_argument("--replica_key", default=None,
                     help="PEM client key for mutual TLS to replicas")
    lim.add_argument("--auth_token_file", default=None,
                     help="calls must carry 'authorization: Bearer <token>' with the token in "
                          "this file; health endpoints stay open")
    lim.add_argument("--rest_header_timeout_s", type=float,
                     default=defaults.rest_header_timeout_s,
                     help="close a REST connection that has not sent a whole request (or "
                          "stays idle) this long (default %(default)s)")
    lim.add_argument("--rest_body_timeout_s", type=float, default=defaults.rest_body_timeout_s,
                     help="answer 408 when a REST body takes longer than this to arrive "
                          "(default %(default)s)")
    mod = parser.add_argument_group("models and versions")
    mod.add_argument("--model_config_file", default=None,
                     help="TFS's model config (text ModelServerConfig): each model's name and "
                          "version_labels, resolved by the proxy for the whole fleet")
    mod.add_argument("--proxy_config_file", default=None,
                     help="per-model settings of the proxy (TOML, [models.NAME]): latest "
                          "policy, canary weights, shadow version, default priority, and "
                          "batching settings (the batching flags are the defaults)")
    mod.add_argument("--model_config_file_poll_wait_seconds", type=float,
                     default=defaults.model_config_file_poll_wait_seconds,
                     help="re-read both config files this often when they change; SIGHUP "
                          "and HandleReloadConfigRequest reload at once (default "
                          "%(default)s: no poll)")
    warm = parser.add_argument_group("warm-up")
    warm.add_argument("--no_warmup", dest="warmup", action="store_false",
                      help="send real calls to a replica (or a new version) at once, without "
                           "first warming it with one batch at each batch size")
    warm.add_argument("--warmup_requests_file", default=None, metavar="FILE",
                      help="TFS warm-up records (a TFRecord of PredictionLog, as in "
                           "assets.extra/tf_serving_warmup_requests) to warm with; without "
                           "it, warm-up batches are zeros shaped by the model's signature")
    parser.add_argument("--drain_timeout_s", type=float, default=defaults.drain_timeout_s,
                        help="on SIGTERM, time to answer accepted calls before exiting "
                             "(default %(default)s)")
    bat = parser.add_argument_group("batching")
    add_batching_flags(bat)
    bat.add_argument("--max_enqueued_bytes", type=int, default=None,
                     help="bytes those queued rows may hold before calls get UNAVAILABLE "
                          f"(default {batching.max_enqueued_bytes}); one call always fits")
    bat.add_argument("--max_forwarded_calls", type=int, default=None,
                     help="unbatched calls (metadata, status, classify, ...) in flight at once "
                          f"before calls get UNAVAILABLE (default {batching.max_forwarded_calls})")
    bat.add_argument("--batching_policy", "--scheduler", dest="batching_policy", default=None,
                     choices=POLICIES,
                     help="when a queue's rows leave and for which replica: 'fixed' is "
                          "TFS's rule (a full batch at once, a partial one when a replica is "
                          "idle and its oldest call waited the timeout); 'adaptive' plans with "
                          "learned replica costs: finish-time routing and staggered starts "
                          f"(default {batching.policy})")


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    settings = batching_settings(
        args, (*BATCHING_FLAGS, "max_enqueued_bytes", "max_forwarded_calls"))
    policy = args.batching_policy or BatchingConfig.policy
    # Flags are named after ProxyConfig's fields, except the two repeatable ones.
    flags = {f.name: getattr(args, f.name) for f in fields(ProxyConfig) if hasattr(args, f.name)}
    flags.update(replicas=tuple(args.replica), replicas_dns=tuple(args.replicas_dns),
                 health_check_models=tuple(args.health_check_model),
                 batching=BatchingConfig(**settings, policy=policy))
    return ProxyConfig(**flags)


def cmd_serve(args: argparse.Namespace) -> None:
    from batchproxy import server
    from batchproxy.model_config import ConfigFiles
    from batchproxy.ports import ListenError

    try:
        config = proxy_config(args)
        # A bad model config stops start-up with its line, before any replica starts.
        ConfigFiles(config.model_config_file, config.proxy_config_file).load()
        if config.warmup and config.warmup_requests_file:
            # A warm-up file that cannot be read stops start-up too, saying why.
            from batchproxy.fleet.warmup import read_warmup_requests
            read_warmup_requests(config.warmup_requests_file)
    except ValueError as err:
        sys.exit(f"batchproxy serve: {err}")
    try:
        server.serve(config, not args.no_uvloop)
    except ListenError as err:
        sys.exit(f"batchproxy serve: {err}")


# Flags every command takes, before or after the subcommand's name.
COMMON_DEFAULTS: dict[str, Any] = {"log_level": "INFO", "log_format": "text",
                                   "no_uvloop": False}


def add_common_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--log_level", default=defaults["log_level"],
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="least severe log level shown (default INFO)")
    parser.add_argument("--log_format", default=defaults["log_format"],
                        choices=["text", "json"],
                        help="plain lines, or one JSON object per line (default text)")
    parser.add_argument("--no_uvloop", action="store_true", default=defaults["no_uvloop"],
                        help="use asyncio's default event loop instead of uvloop")


def build_parser() -> argparse.ArgumentParser:
    from batchproxy import bench, replica

    parser = argparse.ArgumentParser(
        prog="batchproxy",
        description="A batching inference proxy that stands in for TensorFlow Serving.")
    parser.add_argument("--version", action="version", version=f"batchproxy {__version__}")
    add_common_arguments(parser, COMMON_DEFAULTS)
    # Each subcommand takes the same flags after its name; they leave a value only when given
    # there (SUPPRESS), so one given before the subcommand is not reset to its default.
    common = argparse.ArgumentParser(add_help=False)
    add_common_arguments(common, {name: argparse.SUPPRESS for name in COMMON_DEFAULTS})
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy", parents=[common])
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    rep = commands.add_parser("replica", help="run a TFS-compatible reference replica "
                                              "(development and tests only)",
                              parents=[common])
    replica.add_replica_arguments(rep)
    rep.set_defaults(handler=replica.run_replica)
    load = commands.add_parser("bench", help="load generator for the proxy or any TFS "
                                             "endpoint, and a bare echo server",
                               parents=[common])
    bench.add_bench_arguments(load)
    load.set_defaults(handler=bench.run_bench)
    from batchproxy.sim import cli as sim_cli

    sim = commands.add_parser("simulate", help="the real engine in virtual time against "
                                               "simulated replicas, beside baselines",
                              parents=[common])
    sim_cli.add_simulate_arguments(sim)
    sim.set_defaults(handler=sim_cli.run_simulate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    args.handler(args)
