"""Command-line flags that `serve` and `simulate` share, so a simulated proxy is configured
exactly as a real one: batching, and how the proxy treats its replicas."""

from __future__ import annotations

import argparse
from typing import Any

from batchproxy.batching_file import parse_batching_parameters
from batchproxy.config import (
    DEFAULT_HEDGE_PERCENT,
    PADDING_POLICIES,
    BatchingConfig,
    ProxyConfig,
)

BATCHING_FLAGS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_rows",
                  "hedge_budget_percent", "latency_slo_ms", "allowed_batch_sizes",
                  "padding_policy", "variable_length_inputs", "length_buckets",
                  "length_following_outputs")


def variable_inputs(text: str) -> tuple[tuple[str, float | str], ...]:
    """`tokens:0,mask` -> (("tokens", 0.0), ("mask", 0.0)): input names, each with its pad
    value (a number; a string input's pad value is taken as text)."""
    result: list[tuple[str, float | str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition(":")
        pad: float | str = 0.0
        if value:
            try:
                pad = float(value)
            except ValueError:
                pad = value
        result.append((name, pad))
    return tuple(result)


def following_outputs(text: str) -> tuple[tuple[str, int, str], ...]:
    """`out:1=tokens,scores=tokens` -> (("out", 1, "tokens"), ("scores", 1, "tokens")): the
    output, the dimension of it that follows the input's length (default 1), the input."""
    result: list[tuple[str, int, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        output, eq, name = part.partition("=")
        output, _, axis = output.partition(":")
        name = name.partition(":")[0]  # the input's variable dimension is dimension 1
        if not eq or not output or not name:
            raise argparse.ArgumentTypeError(f"{part!r} is not OUTPUT[:AXIS]=INPUT")
        try:
            result.append((output, int(axis or 1), name))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the axis must be a number") from None
    return tuple(result)


def batch_sizes(text: str) -> tuple[int, ...]:
    """`8,16,32` as a tuple; argparse reports the ValueError as a bad value."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of sizes") from None


def add_batching_flags(group: argparse._ArgumentGroup) -> None:
    batching = BatchingConfig()
    group.add_argument("--max_batch_size", type=int, default=None,
                       help=f"rows in one batch at most (default {batching.max_batch_size})")
    group.add_argument("--batch_timeout_micros", type=int, default=None,
                       help="how long the oldest call of a batch may wait before the batch "
                            f"closes (default {batching.batch_timeout_micros})")
    group.add_argument("--max_enqueued_rows", type=int, default=None,
                       help="rows queued in all batches together before calls get "
                            "UNAVAILABLE (default max(3200, 100 x max_batch_size); with a "
                            "batching file, its max_enqueued_batches x max_batch_size)")
    group.add_argument("--batching_parameters_file", default=None,
                       help="TFS batching parameters (text proto): max_batch_size, "
                            "batch_timeout_micros, max_enqueued_batches; flags override it")
    group.add_argument("--hedge_budget_percent", type=float, default=None, metavar="PERCENT",
                       help="a batch overdue on its replica (3x its learned time) is sent "
                            "again to another; hedges are at most PERCENT %% of batches sent, "
                            "plus one a second; 0 turns hedging off (default "
                            f"{DEFAULT_HEDGE_PERCENT:g}; 0 with --batching_policy fixed)")

    group.add_argument("--allowed_batch_sizes", type=batch_sizes, default=None,
                       metavar="N,N,...",
                       help="batch sizes a replica accepts (a compiled model's): a batch is "
                            "padded up to the next with copies of one of its rows, cut from "
                            "the answer; strictly increasing, the last equal to "
                            "max_batch_size (default: any size)")
    group.add_argument("--padding_policy", default=None, choices=PADDING_POLICIES,
                       help="with allowed sizes, a batch between two: pad_up pads it (TFS), "
                            "batch_down sends the largest allowed size that fits and keeps "
                            "the rest queued, min_cost picks the cheaper per real row by the "
                            "replica's learned cost; the default for models without their own "
                            f"(default {batching.padding_policy})")
    group.add_argument("--variable_length_inputs", type=variable_inputs, default=None,
                       metavar="NAME[:PAD],...",
                       help="inputs whose dimension 1 (a length) may differ between calls "
                            "that share a batch: each is padded to the longest in its batch "
                            "with PAD (0 when not given), never with its first element")
    group.add_argument("--length_buckets", type=batch_sizes, default=None, metavar="N,N,...",
                       help="with --variable_length_inputs, only calls whose lengths fall "
                            "in one bucket (up to 32, up to 64, ...) share a batch; longer "
                            "ones batch with their exact length (default: all lengths)")
    group.add_argument("--length_following_outputs", type=following_outputs, default=None,
                       metavar="OUT[:AXIS]=IN,...",
                       help="outputs whose dimension AXIS (1 when not given) follows the length of "
                            "input IN: cut back to each caller's own length; other outputs "
                            "are returned as the model computed them")
    group.add_argument("--latency_slo_ms", type=float, default=None, metavar="MS",
                       help="latency objective of every call: one that the queue ahead "
                            "would keep longer is refused at once with UNAVAILABLE, as one "
                            "past its own deadline is (default 0: none)")


def add_replica_flags(group: argparse._ArgumentGroup) -> None:
    defaults = ProxyConfig()
    group.add_argument("--max_inflight_per_replica", type=int,
                       default=defaults.max_inflight_per_replica,
                       help="batches one replica may hold at once (default %(default)s)")
    group.add_argument("--replica_timeout_s", type=float, default=defaults.replica_timeout_s,
                       help="limit on a replica call when the caller set no deadline "
                            "(default %(default)s)")
    group.add_argument("--health_interval_ms", type=int, default=defaults.health_interval_ms,
                       help="GetModelStatus health check period per replica "
                            "(default %(default)s)")
    group.add_argument("--eject_after_failures", type=int,
                       default=defaults.eject_after_failures,
                       help="consecutive failed calls that eject a replica "
                            "(default %(default)s)")


def batching_settings(args: argparse.Namespace,
                      names: tuple[str, ...] = BATCHING_FLAGS) -> dict[str, Any]:
    """BatchingConfig's fields from the batching parameters file, then the flags over it;
    max_enqueued_rows defaults to 100 full batches (at least BatchingConfig's default)."""
    settings: dict[str, Any] = {}
    if args.batching_parameters_file:
        settings.update(parse_batching_parameters(args.batching_parameters_file))
    for name in names:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if "max_enqueued_rows" not in settings:
        batch = settings.get("max_batch_size", BatchingConfig.max_batch_size)
        settings["max_enqueued_rows"] = max(BatchingConfig.max_enqueued_rows, 100 * batch)
    return settings
