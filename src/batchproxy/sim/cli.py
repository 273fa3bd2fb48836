"""`batchproxy simulate`: the flags, and what runs them."""

from __future__ import annotations

import argparse
import logging
import sys

from batchproxy.config import BatchingConfig
from batchproxy.flags import add_batching_flags, add_replica_flags, batching_settings
from batchproxy.sim.faults import parse_fault
from batchproxy.sim.simulate import SimConfig, simulate


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers separated by commas") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    sim = SimConfig()
    bat = parser.add_argument_group("batching (as `serve`)")
    add_batching_flags(bat)
    add_replica_flags(bat)
    bat.add_argument("--batching_policy", "--policy", dest="policy", default=None,
                     help="the proxy's flush policy; a comma-separated list compares several "
                          "(default: the engine's)")
    fleet = parser.add_argument_group("simulated replicas")
    fleet.add_argument("--replicas", type=int, default=sim.replicas,
                       help="replicas (default %(default)s)")
    fleet.add_argument("--batch_cost_ms", type=float, default=sim.batch_cost_ms,
                       help="fixed cost of one batch (default %(default)s)")
    fleet.add_argument("--row_cost_us", type=float, default=sim.row_cost_us,
                       help="cost of each row of a batch (default %(default)s)")
    fleet.add_argument("--concurrency", type=int, default=sim.concurrency,
                       help="batches a replica runs at once (default %(default)s)")
    fleet.add_argument("--jitter", type=float, default=sim.jitter,
                       help="spread of each batch's cost: a log-normal factor of mean 1 and "
                            "this shape (default %(default)s)")
    fleet.add_argument("--network_ms", type=float, default=sim.network_ms,
                       help="round trip of each batch between the proxy and a replica, half "
                            "each way (default %(default)s)")
    fleet.add_argument("--slow_replica", type=float, default=sim.slow_replica,
                       metavar="FACTOR", help="the last replica's costs are FACTOR times "
                                              "the others' (default %(default)s)")
    fleet.add_argument("--fault", action="append", default=[], metavar="SPEC",
                       help="KIND:REPLICA:START-END[:VALUE], KIND one of crash, hang, "
                            "slow (VALUE: factor), errors (VALUE: probability); REPLICA an "
                            "index or *; repeatable")
    load = parser.add_argument_group("workload")
    load.add_argument("--workload", default=sim.workload,
                      choices=["poisson", "bursts", "trace"],
                      help="arrival process (default %(default)s)")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_numbers, default=None,
                      help="offered calls/s; several, comma-separated, make a sweep")
    rate.add_argument("--load", type=_numbers, default=None,
                      help="offered load as fractions of capacity, e.g. 0.3,0.6,0.9; "
                           "capacity = replicas x concurrency x max_batch_size / "
                           "(batch_cost + max_batch_size x row_cost) rows/s "
                           f"(default {','.join(str(x) for x in sim.loads)})")
    load.add_argument("--duration", type=float, default=None,
                      help="virtual seconds of arrivals (default 10; a trace: its span in whole "
                           "seconds)")
    load.add_argument("--warmup", type=float, default=sim.warmup_s,
                      help="virtual seconds of arrivals before the measured --duration "
                           "(default %(default)s)")
    load.add_argument("--models", default=sim.models,
                      help="model names, with weights: a:3,b:1 (default %(default)s)")
    load.add_argument("--rows", default=sim.rows,
                      help="rows per call, with weights: 1:4,8 or a range 1-8 "
                           "(default %(default)s)")
    load.add_argument("--deadline_ms", type=float, default=sim.deadline_ms,
                      help="every call's deadline; 0: none (default %(default)s)")
    load.add_argument("--sheddable", type=float, default=sim.sheddable, metavar="SHARE",
                      help="share of calls sent as sheddable, the rest critical; the report "
                           "then gives each class's figures (default %(default)s)")
    load.add_argument("--trace", default=None, metavar="FILE",
                      help="CSV with time_s, rows, model, deadline_ms (--workload trace)")
    load.add_argument("--burst_on_s", type=float, default=sim.burst_on_s,
                      help="bursts: seconds on (default %(default)s)")
    load.add_argument("--burst_off_s", type=float, default=sim.burst_off_s,
                      help="bursts: seconds off (default %(default)s)")
    out = parser.add_argument_group("measures and output")
    out.add_argument("--seed", type=int, default=sim.seed,
                     help="same seed, same numbers (default %(default)s)")
    out.add_argument("--slo_ms", type=float, default=sim.slo_ms,
                     help="goodput counts calls answered OK within this (default %(default)s)")
    out.add_argument("--baselines", type=_names, default=sim.systems,
                     help="systems to run side by side: direct, tfs, proxy "
                          f"(default {','.join(sim.systems)})")
    out.add_argument("--json", default=None, metavar="FILE",
                     help="write every figure as JSON (sorted keys, rounded floats)")
    out.add_argument("--plot", default=None, metavar="FILE.png",
                     help="p50 and p99 against offered load, one line per system")


# Shared with `serve`, but the simulator's workloads send one fixed shape per call kind:
# refused rather than silently ignored (benchmarks/sim/shapes.py runs them in virtual time).
NOT_SIMULATED = ("variable_length_inputs", "length_buckets", "length_following_outputs")


def sim_config(args: argparse.Namespace) -> SimConfig:
    settings = batching_settings(args)
    for name in NOT_SIMULATED:
        if settings.get(name):
            raise ValueError(f"--{name} is not simulated: the workloads have fixed shapes "
                             "(benchmarks/sim/shapes.py measures variable-length batching)")
    systems: list[str] = []
    for system in args.baselines:
        if system == "proxy" and args.policy:
            systems.extend(f"proxy:{policy}" for policy in _names(args.policy))
        else:
            systems.append(system)
    workload = args.workload
    if args.trace and workload == "poisson":
        workload = "trace"  # a trace given means replay it
    rates: tuple[float, ...] = args.rate or ()
    return SimConfig(
        replicas=args.replicas, concurrency=args.concurrency,
        batch_cost_ms=args.batch_cost_ms, row_cost_us=args.row_cost_us, jitter=args.jitter,
        network_ms=args.network_ms, slow_replica=args.slow_replica,
        faults=tuple(parse_fault(spec) for spec in args.fault),
        max_batch_size=settings.get("max_batch_size", BatchingConfig.max_batch_size),
        batch_timeout_micros=settings.get("batch_timeout_micros",
                                          BatchingConfig.batch_timeout_micros),
        max_enqueued_rows=settings.get("max_enqueued_rows"),
        hedge_budget_percent=settings.get("hedge_budget_percent"),
        latency_slo_ms=settings.get("latency_slo_ms", 0.0),
        allowed_batch_sizes=settings.get("allowed_batch_sizes", ()),
        padding_policy=settings.get("padding_policy", BatchingConfig.padding_policy),
        max_inflight_per_replica=args.max_inflight_per_replica,
        replica_timeout_s=args.replica_timeout_s, health_interval_ms=args.health_interval_ms,
        eject_after_failures=args.eject_after_failures,
        workload=workload, rates=rates, loads=args.load or SimConfig.loads,
        duration_s=args.duration, warmup_s=args.warmup, models=args.models, rows=args.rows,
        deadline_ms=args.deadline_ms, sheddable=args.sheddable, trace=args.trace,
        burst_on_s=args.burst_on_s,
        burst_off_s=args.burst_off_s, slo_ms=args.slo_ms, seed=args.seed,
        systems=tuple(systems))


def run_simulate(args: argparse.Namespace) -> None:
    if args.log_level != "DEBUG":
        # The fleet logs every replica joining and every ejection: in a sweep of simulated
        # fleets that is thousands of lines, stamped with wall-clock times that mean nothing
        # here. DEBUG shows them.
        logging.getLogger("batchproxy.fleet").setLevel(logging.WARNING)
    try:
        config = sim_config(args)
        report = simulate(config)
    except (ValueError, OSError) as err:
        sys.exit(f"batchproxy simulate: {err}")
    print(report.table())
    if args.json:
        report.write_json(args.json)
    if args.plot:
        from batchproxy.sim.plot import plot_sweep

        try:
            plot_sweep(report.runs, args.plot)
        except RuntimeError as err:
            sys.exit(f"batchproxy simulate: {err}")
