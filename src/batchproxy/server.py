"""Assembles a proxy process: replica pool, batcher and frontends, and its orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc

from batchproxy import __version__, core
from batchproxy.batching import Batcher
from batchproxy.config import ProxyConfig
from batchproxy.discovery import DnsDiscovery
from batchproxy.frontend_grpc import PredictionHandlers, generic_handlers
from batchproxy.health import Readiness
from batchproxy.health_checks import HealthChecker
from batchproxy.local_replicas import LocalReplicas
from batchproxy.pool import UNLIMITED_MESSAGES, Replica, ReplicaPool, ReplicaState

log = logging.getLogger("batchproxy")


def log_state_change(replica: Replica, old: ReplicaState, reason: str) -> None:
    log.info("replica %s: %s -> %s (%s)", replica.address, old.value, replica.state.value,
             reason)


class Proxy:
    def __init__(self, config: ProxyConfig, replicas: list[str]) -> None:
        self.config = config
        self.pool = ReplicaPool(replicas, config.max_inflight_per_replica,
                                config.replica_timeout_s,
                                eject_after_failures=config.eject_after_failures,
                                ejection_base_s=max(config.health_interval_ms / 1000, 0.1),
                                reconnect_backoff_ms=max(config.health_interval_ms, 100))
        self.pool.listeners.append(log_state_change)
        self.health_checker = HealthChecker(self.pool, config.health_interval_ms / 1000,
                                            config.health_check_models)
        self.discovery: DnsDiscovery | None = None
        if config.replicas_dns:
            self.discovery = DnsDiscovery(self.pool, list(config.replicas_dns), replicas,
                                          config.dns_refresh_s, config.dns_server)
            self.discovery.on_change.append(self.health_checker.check_soon)
        self.readiness = Readiness(self.pool)
        self.batcher = Batcher(config.batching, self.pool)
        self.grpc_server = grpc.aio.server(options=UNLIMITED_MESSAGES)
        self.grpc_server.add_generic_rpc_handlers(
            [*generic_handlers(PredictionHandlers(self.batcher, self.pool)),
             self.readiness.grpc_handler()])
        self.grpc_port = self.grpc_server.add_insecure_port(f"{config.host}:{config.port}")

    async def start(self) -> None:
        if self.discovery is not None:
            await self.discovery.refresh()
            self.discovery.start()
        self.health_checker.start()
        self.batcher.start()
        await self.grpc_server.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, answer every accepted one (queued batches are flushed and
        in-flight batches finish), then close; all within `grace_s`."""
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        self.readiness.draining = True
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.drain(), grace_s)
        await stopping
        await self.batcher.close()
        if self.discovery is not None:
            await self.discovery.close()
        await self.health_checker.close()
        await self.pool.close()


def banner(config: ProxyConfig, replicas: list[str], grpc_port: int) -> str:
    batching = config.batching
    return (
        f"batchproxy {__version__} core={core.IMPLEMENTATION} grpc_port={grpc_port} "
        f"replicas=[{', '.join(replicas)}] max_batch_size={batching.max_batch_size} "
        f"batch_timeout_micros={batching.batch_timeout_micros} "
        f"max_enqueued_rows={batching.max_enqueued_rows} "
        f"max_inflight_per_replica={config.max_inflight_per_replica}"
    )


async def run(config: ProxyConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    local: LocalReplicas | None = None
    replicas = list(config.replicas)
    if not replicas and not config.replicas_dns:
        local = LocalReplicas(config.local_replicas, config.local_replica_model,
                              config.model_name)
        replicas = await local.start()
    try:
        proxy = Proxy(config, replicas)
        await proxy.start()
        log.info(banner(config, replicas, proxy.grpc_port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: draining queued and in-flight batches")
        await proxy.stop()
    finally:
        if local is not None:
            await local.stop()
