"""The proxy under simulation: the real engine, slots and health checks, with simulated
replicas plugged in as the fleet's transports. Only the network is simulated."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.fleet.transport import Transport
from batchproxy.metrics import ProxyMetrics
from batchproxy.priority import Priority
from batchproxy.sim.replicas import SimReplica
from batchproxy.sim.workloads import Arrival, Shape


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    """The proxy's replica settings (the `serve` flags of the same names)."""

    max_inflight_per_replica: int = 2
    replica_timeout_s: float = 30.0
    health_interval_ms: int = 1000
    eject_after_failures: int = 2
    ejection_base_s: float = 1.0


def batching_config(max_batch_size: int, batch_timeout_micros: int, max_enqueued_rows: int,
                    policy: str | None = None,
                    hedge_budget_percent: float | None = None,
                    latency_slo_ms: float = 0.0,
                    allowed_batch_sizes: tuple[int, ...] = (),
                    padding_policy: str = "pad_up") -> BatchingConfig:
    settings: dict[str, Any] = dict(max_batch_size=max_batch_size,
                                    batch_timeout_micros=batch_timeout_micros,
                                    max_enqueued_rows=max_enqueued_rows,
                                    hedge_budget_percent=hedge_budget_percent,
                                    latency_slo_ms=latency_slo_ms,
                                    allowed_batch_sizes=allowed_batch_sizes,
                                    padding_policy=padding_policy)
    if policy is not None:
        settings["policy"] = policy
    return BatchingConfig(**settings)


class ProxySystem:
    def __init__(self, replicas: Sequence[SimReplica], shapes: Sequence[Shape],
                 config: BatchingConfig, fleet: FleetSettings, seed: int,
                 name: str = "proxy") -> None:
        self.name = name
        self.shapes = shapes
        self.config = config
        by_address = {replica.address: replica for replica in replicas}

        def transport(address: str) -> Transport:
            return by_address[address]

        self.pool = ReplicaPool(
            list(by_address), fleet.max_inflight_per_replica, fleet.replica_timeout_s,
            eject_after_failures=fleet.eject_after_failures,
            ejection_base_s=fleet.ejection_base_s, transports=transport, seed=seed)
        models = tuple(sorted({shape.model for shape in shapes}))
        self.health = HealthChecker(self.pool, fleet.health_interval_ms / 1000, models)
        self.metrics = ProxyMetrics()
        self.engine = Engine(self.config, self.pool, self.metrics)

    def start(self) -> None:
        # Checks first: their first round runs at once and finds the replicas healthy
        # before the first call is scheduled.
        self.health.start()
        self.engine.start()

    async def submit(self, arrival: Arrival) -> None:
        call = codec.decode_predict_request(self.shapes[arrival.shape].request)
        priority = Priority.SHEDDABLE if arrival.sheddable else Priority.CRITICAL
        await self.engine.submit(call, arrival.deadline_s, priority)

    async def close(self) -> None:
        await self.engine.close()
        await self.health.close()
        await self.pool.close()
