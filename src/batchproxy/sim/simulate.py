"""One simulation: for each offered rate, the same calls through each system (the proxy and
its baselines), each on a fresh virtual-time loop with fresh replicas seeded alike."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from batchproxy.errors import ProxyError
from batchproxy.sim import workloads
from batchproxy.sim.baselines import DirectSystem, TfsSystem
from batchproxy.sim.clock import run_virtual
from batchproxy.sim.faults import Fault, FaultSchedule
from batchproxy.sim.proxy import FleetSettings, ProxySystem, batching_config
from batchproxy.sim.replicas import Cost, SimReplica, sleep_until
from batchproxy.sim.report import OK, Outcomes, RunResult, SimReport, by_priority
from batchproxy.sim.workloads import Arrival, Mix, Shape, ShapeTable

SYSTEMS = ("direct", "tfs", "proxy")


@dataclass(frozen=True)
class SimConfig:
    # The fleet: replicas and their cost model.
    replicas: int = 4
    concurrency: int = 1  # batches a replica runs at once
    batch_cost_ms: float = 10.0
    row_cost_us: float = 200.0
    model_costs: tuple[tuple[str, float, float], ...] = ()  # (model, batch ms, row us)
    jitter: float = 0.0  # log-normal shape of the cost factor (about its CV when small)
    network_ms: float = 0.0  # round trip of each proxy call to a replica, half each way
    speeds: tuple[float, ...] = ()  # per-replica cost factor; missing ones are 1
    slow_replica: float = 1.0  # cost factor of the last replica (applied over `speeds`)
    faults: tuple[Fault, ...] = ()
    # The proxy, with `serve`'s defaults.
    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    max_enqueued_rows: int | None = None  # None: as `serve`, max(3200, 100 * batch)
    hedge_budget_percent: float | None = None  # None: as `serve`, the policy's default
    latency_slo_ms: float = 0.0  # the proxy's --latency_slo_ms (0: none)
    allowed_batch_sizes: tuple[int, ...] = ()  # the proxy's --allowed_batch_sizes
    padding_policy: str = "pad_up"  # and --padding_policy
    max_inflight_per_replica: int = 2
    replica_timeout_s: float = 30.0
    health_interval_ms: int = 1000
    eject_after_failures: int = 2
    ejection_base_s: float = 1.0
    # The workload.
    workload: str = "poisson"  # poisson | bursts | trace
    rates: tuple[float, ...] = ()  # calls/s; when empty, `loads` of the capacity
    loads: tuple[float, ...] = (0.5,)
    duration_s: float | None = None  # None: 10 s; a trace: its span in whole seconds
    # Seconds of arrivals before the measured ones: learned costs settle, as a real
    # benchmark's warm-up lets them.
    warmup_s: float = 0.0
    models: str = "model"  # weighted choice, "a:3,b:1"
    rows: str = "1"  # weighted choice, "1:4,8", or a range "1-8"
    deadline_ms: float = 0.0  # 0: calls carry no deadline
    sheddable: float = 0.0  # share of calls sent as sheddable; the rest are critical
    trace: str | None = None
    burst_on_s: float = 1.0
    burst_off_s: float = 1.0
    features: int = 4  # float32 columns of each row
    # Measures and systems.
    slo_ms: float = 100.0
    seed: int = 0
    # "direct", "tfs", "proxy", or "proxy:POLICY" for the engine with a given flush policy.
    systems: tuple[str, ...] = SYSTEMS

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.concurrency < 1:
            raise ValueError("replicas and concurrency must be at least 1")
        if self.network_ms < 0:
            raise ValueError("the round trip (network_ms) must not be negative")
        if not 0.0 <= self.sheddable <= 1.0:
            raise ValueError("the sheddable share must be between 0 and 1")
        if self.workload not in ("poisson", "bursts", "trace"):
            raise ValueError(f"unknown workload {self.workload!r}")
        if self.workload == "trace" and not self.trace:
            raise ValueError("the trace workload needs a trace file")
        for system in self.systems:
            if system.partition(":")[0] not in SYSTEMS:
                raise ValueError(f"unknown system {system!r}; expected {', '.join(SYSTEMS)} "
                                 "or proxy:POLICY")

    @property
    def enqueued_rows(self) -> int:
        if self.max_enqueued_rows is not None:
            return self.max_enqueued_rows
        return max(3200, 100 * self.max_batch_size)

    def mix(self) -> Mix:
        return Mix(models=workloads.parse_weighted(self.models, str),
                   rows=workloads.parse_weighted(self.rows, int),
                   deadline_s=self.deadline_ms / 1000 if self.deadline_ms > 0 else None)

    def capacity_rows_per_s(self) -> float:
        """What the fleet serves with full batches all the time: replicas * k * B /
        (a + B * b), at the nominal cost (no slow replica, no jitter)."""
        batch = self.max_batch_size
        seconds = self.batch_cost_ms / 1000 + batch * self.row_cost_us / 1e6
        return self.replicas * self.concurrency * batch / seconds


class System(Protocol):
    name: str

    def start(self) -> None: ...

    async def submit(self, arrival: Arrival) -> None: ...

    async def close(self) -> None: ...


def make_replicas(config: SimConfig, window_s: float,
                  models: frozenset[str]) -> list[SimReplica]:
    default = Cost(config.batch_cost_ms / 1000, config.row_cost_us / 1e6)
    costs = {model: Cost(batch_ms / 1000, row_us / 1e6)
             for model, batch_ms, row_us in config.model_costs}
    replicas = []
    for index in range(config.replicas):
        speed = config.speeds[index] if index < len(config.speeds) else 1.0
        if index == config.replicas - 1:
            speed *= config.slow_replica
        replicas.append(SimReplica(
            f"replica-{index}", index, costs, default, concurrency=config.concurrency,
            speed=speed, jitter=config.jitter,
            faults=FaultSchedule.for_replica(list(config.faults), index), seed=config.seed,
            window_s=window_s, models=models, network_s=config.network_ms / 1000))
    return replicas


def make_system(kind: str, config: SimConfig, replicas: list[SimReplica],
                shapes: list[Shape]) -> System:
    name, _, policy = kind.partition(":")
    if name == "direct":
        return DirectSystem(replicas, shapes)
    if name == "tfs":
        return TfsSystem(replicas, shapes, config.max_batch_size,
                         config.batch_timeout_micros / 1e6,
                         max(1, config.enqueued_rows // config.max_batch_size))
    fleet = FleetSettings(config.max_inflight_per_replica, config.replica_timeout_s,
                          config.health_interval_ms, config.eject_after_failures,
                          config.ejection_base_s)
    batching = batching_config(config.max_batch_size, config.batch_timeout_micros,
                               config.enqueued_rows, policy or None,
                               config.hedge_budget_percent, config.latency_slo_ms,
                               config.allowed_batch_sizes, config.padding_policy)
    return ProxySystem(replicas, shapes, batching, fleet, config.seed, name=kind)


class UnansweredCalls(RuntimeError):
    """Calls still waiting long after the last arrival: a system lost them."""


async def drive(system: System, arrivals: list[Arrival],
                drain_limit_s: float = 3600.0) -> Outcomes:
    """Offer every call at its arrival time, each as its own task, and wait for all, at most
    `drain_limit_s` virtual seconds after the last arrival (the proxy's health checks keep
    the loop alive forever, so a lost call would otherwise never end the run)."""
    loop = asyncio.get_running_loop()
    count = len(arrivals)
    outcomes = Outcomes([0.0] * count, [OK] * count)
    latencies, codes = outcomes.latencies_s, outcomes.codes
    pending = count
    all_done: asyncio.Future[None] = loop.create_future()

    async def one(i: int, arrival: Arrival) -> None:
        nonlocal pending
        try:
            await system.submit(arrival)
        except ProxyError as err:
            codes[i] = err.code.name
        except Exception as err:  # a bug in a system: end the run with it
            if not all_done.done():
                all_done.set_exception(err)
            return
        latency = loop.time() - arrival.time_s
        deadline = arrival.deadline_s
        if deadline is not None and latency > deadline and codes[i] == OK:
            # The caller's own gRPC deadline would have ended the call first.
            codes[i] = "DEADLINE_EXCEEDED"
        latencies[i] = latency
        pending -= 1
        if pending == 0 and not all_done.done():
            all_done.set_result(None)

    system.start()
    tasks = set()
    for i, arrival in enumerate(arrivals):
        if arrival.time_s > loop.time():
            await sleep_until(arrival.time_s)
        task = loop.create_task(one(i, arrival))
        tasks.add(task)  # a reference, so the task cannot be collected mid-run
        task.add_done_callback(tasks.discard)
    if count:
        try:
            await asyncio.wait_for(all_done, drain_limit_s)
        except TimeoutError:
            raise UnansweredCalls(
                f"{system.name}: {pending} of {count} calls still unanswered "
                f"{drain_limit_s:g} virtual seconds after the last arrival") from None
    outcomes.end_s = loop.time()
    await system.close()
    return outcomes


def offered(config: SimConfig, rate: float, table: ShapeTable) -> list[Arrival]:
    """The calls each system is offered at `rate` calls/s (warm-up included), as `simulate`
    draws them: seeded, so every system and every other use sees the same ones."""
    return workloads.mark_sheddable(
        _arrivals(config, rate, config.warmup_s + _duration(config), table), config.sheddable,
        config.seed)


def _arrivals(config: SimConfig, rate: float, duration_s: float,
              table: ShapeTable) -> list[Arrival]:
    mix = config.mix()
    if config.workload == "poisson":
        return workloads.poisson(rate, duration_s, mix, table, config.seed)
    if config.workload == "bursts":
        return workloads.bursts(rate, duration_s, mix, table, config.seed,
                                config.burst_on_s, config.burst_off_s)
    assert config.trace is not None
    return [a for a in workloads.read_trace(config.trace, table) if a.time_s < duration_s]


def _duration(config: SimConfig) -> float:
    if config.duration_s is not None:
        return config.duration_s
    if config.workload == "trace":
        assert config.trace is not None
        times = [a.time_s for a in workloads.read_trace(config.trace,
                                                         ShapeTable(config.features))]
        # The trace's span in whole seconds (at least one), so its last call is replayed
        # and rates per second have a sensible denominator.
        return float(max(1, math.floor(max(times, default=0.0)) + 1))
    return 10.0


def sweep(config: SimConfig) -> list[tuple[float, float | None]]:
    """(calls/s, load) of each point; load is None for a rate given as such."""
    if config.workload == "trace":
        return [(0.0, None)]
    if config.rates:
        return [(rate, None) for rate in config.rates]
    calls_per_s = config.capacity_rows_per_s() / config.mix().mean_rows()
    return [(load * calls_per_s, load) for load in config.loads]


def simulate(config: SimConfig,
             progress: Callable[[RunResult], None] | None = None) -> SimReport:
    duration = _duration(config)
    runs: list[RunResult] = []
    for rate, load in sweep(config):
        table = ShapeTable(config.features)
        arrivals = offered(config, rate, table)
        if config.workload == "trace":
            rate = len(arrivals) / duration if duration else 0.0
        measured = [a.time_s >= config.warmup_s for a in arrivals]
        models = frozenset(table.models())
        for kind in config.systems:
            replicas = make_replicas(config, config.warmup_s + duration, models)
            system = make_system(kind, config, replicas, table.shapes)
            outcomes = run_virtual(drive(system, arrivals)).only(measured)
            result = RunResult.of(kind, rate, load, duration, config.slo_ms / 1000, outcomes,
                                  [r.record for r in replicas], config.concurrency,
                                  busy_window_s=config.warmup_s + duration)
            if config.sheddable > 0:
                result.classes = by_priority(outcomes, [a.sheddable for a, keep in
                                                        zip(arrivals, measured, strict=True)
                                                        if keep],
                                             duration, config.slo_ms / 1000)
            runs.append(result)
            if progress is not None:
                progress(result)
    return SimReport(config=config_dict(config), runs=runs,
                     capacity_rows_per_s=config.capacity_rows_per_s())


def config_dict(config: SimConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["faults"] = [dataclasses.asdict(f) for f in config.faults]
    return data
