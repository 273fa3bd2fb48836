"""Assembles a proxy process: replica pool, batcher and frontends, and its orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from aiohttp import web

from batchproxy import __version__, core, workers
from batchproxy.auth import TokenAuth
from batchproxy.engine.batching import Batcher
from batchproxy.config import ProxyConfig
from batchproxy.fleet.discovery import DnsDiscovery
from batchproxy.event_loop import run_loop
from batchproxy.frontends.grpc import PredictionHandlers, generic_handlers
from batchproxy.frontends.rest import RestServer
from batchproxy.readiness import Readiness
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.frontends.limits import RequestLimits
from batchproxy.local_replicas import LocalReplicas
from batchproxy.metrics import GaugeSampler, ProxyMetrics
from batchproxy.fleet.slots import Replica, ReplicaPool, ReplicaState
from batchproxy.tls import ServerTLS, replica_credentials

log = logging.getLogger("batchproxy")


def log_state_change(replica: Replica, old: ReplicaState, reason: str) -> None:
    log.info("replica %s: %s -> %s (%s)", replica.address, old.value, replica.state.value,
             reason)


def server_options(config: ProxyConfig) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", -1)]


class Proxy:
    def __init__(self, config: ProxyConfig, replicas: list[str]) -> None:
        self.config = config
        self.tls = ServerTLS.from_tfs_file(config.ssl_config_file) \
            if config.ssl_config_file else None
        self.auth = TokenAuth.from_file(config.auth_token_file) \
            if config.auth_token_file else None
        self.pool = ReplicaPool(replicas, config.max_inflight_per_replica,
                                config.replica_timeout_s,
                                eject_after_failures=config.eject_after_failures,
                                ejection_base_s=max(config.health_interval_ms / 1000, 0.1),
                                reconnect_backoff_ms=max(config.health_interval_ms, 100),
                                credentials=replica_credentials(
                                    config.replica_ca, config.replica_cert,
                                    config.replica_key))
        self.pool.listeners.append(log_state_change)
        self.metrics = ProxyMetrics()
        self.pool.listeners.append(self._count_ejection)
        self.sampler = GaugeSampler(self._sample_gauges)
        self.monitoring_runner: web.AppRunner | None = None
        self.health_checker = HealthChecker(self.pool, config.health_interval_ms / 1000,
                                            config.health_check_models)
        self.discovery: DnsDiscovery | None = None
        if config.replicas_dns:
            self.discovery = DnsDiscovery(self.pool, list(config.replicas_dns), replicas,
                                          config.dns_refresh_s, config.dns_server)
            self.discovery.on_change.append(self.health_checker.check_soon)
        self.readiness = Readiness(self.pool)
        self.batcher = Batcher(config.batching, self.pool, self.metrics)
        self.grpc_server = grpc.aio.server(options=server_options(config))
        limits = RequestLimits(config.max_rows_per_request, config.max_rank)
        handlers = PredictionHandlers(self.batcher, self.pool, self.metrics, auth=self.auth,
                                      limits=limits)
        self.grpc_server.add_generic_rpc_handlers(
            [*generic_handlers(handlers), self.readiness.grpc_handler()])
        address = f"{config.host}:{config.port}"
        if self.tls is not None:
            self.grpc_port = self.grpc_server.add_secure_port(address,
                                                              self.tls.grpc_credentials())
        else:
            self.grpc_port = self.grpc_server.add_insecure_port(address)
        # TFS's REST API on the same batcher (rest_api_port 0 turns it off, as in TFS), with
        # the metrics routes TFS serves on its REST port.
        self.rest: RestServer | None = None
        if config.rest_api_port:
            self.rest = RestServer(
                self.batcher, self.pool, config.host, config.rest_api_port,
                max_body_bytes=config.rest_max_body_bytes, metrics=self.metrics,
                extra_routes=self.metrics.routes() + self.readiness.routes(),
                reuse_port=config.workers > 1, shutdown_timeout_s=config.drain_timeout_s,
                auth=self.auth,
                ssl_context=self.tls.ssl_context() if self.tls is not None else None,
                header_timeout_s=config.rest_header_timeout_s,
                body_timeout_s=config.rest_body_timeout_s, limits=limits)

    def _count_ejection(self, replica: Replica, old: ReplicaState, reason: str) -> None:
        if replica.state is ReplicaState.EJECTED:
            self.metrics.ejections.labels(replica.address).inc()

    def _sample_gauges(self) -> None:
        self.metrics.queued_rows.set(self.batcher.queued_rows)
        self.metrics.worker_calls.set(self.metrics.calls_handled)
        for replica in self.pool.replicas.values():
            self.metrics.outstanding.labels(replica.address).set(replica.outstanding)
            self.metrics.replica_healthy.labels(replica.address).set(
                1 if replica.state is ReplicaState.HEALTHY else 0)

    async def _start_monitoring(self) -> None:
        """Metrics on a port of their own (--monitoring_port), e.g. bound to another address
        than the traffic ports."""
        app = web.Application()
        app.add_routes(self.metrics.routes() + self.readiness.routes())
        self.monitoring_runner = web.AppRunner(app, access_log=None)
        await self.monitoring_runner.setup()
        site = web.TCPSite(self.monitoring_runner, self.config.monitoring_host,
                           self.config.monitoring_port, reuse_port=True)
        await site.start()

    async def start(self) -> None:
        self.sampler.start()
        if self.config.monitoring_port:
            await self._start_monitoring()
        if self.discovery is not None:
            await self.discovery.refresh()
            self.discovery.start()
        self.health_checker.start()
        self.batcher.start()
        await self.grpc_server.start()
        if self.rest is not None:
            await self.rest.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, answer every accepted one (queued batches are flushed and
        in-flight batches finish), then close; all within `grace_s`."""
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        self.readiness.draining = True
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace_s))
        rest_stopping = asyncio.ensure_future(self.rest.stop()) if self.rest else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.drain(), grace_s)
        await stopping
        if rest_stopping is not None:
            await rest_stopping
        await self.batcher.close()
        if self.discovery is not None:
            await self.discovery.close()
        await self.health_checker.close()
        await self.sampler.close()
        if self.monitoring_runner is not None:
            await self.monitoring_runner.cleanup()
        await self.pool.close()


def banner(config: ProxyConfig, replicas: list[str], grpc_port: int) -> str:
    batching = config.batching
    return (
        f"batchproxy {__version__} core={core.IMPLEMENTATION} grpc_port={grpc_port} "
        f"rest_api_port={config.rest_api_port} "
        f"replicas=[{', '.join(replicas)}] max_batch_size={batching.max_batch_size} "
        f"batch_timeout_micros={batching.batch_timeout_micros} "
        f"max_enqueued_rows={batching.max_enqueued_rows} "
        f"max_inflight_per_replica={config.max_inflight_per_replica}"
    )


async def run(config: ProxyConfig, replicas: list[str]) -> None:
    """One proxy on this process's event loop until SIGTERM or SIGINT, then drain and exit."""
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


def serve(config: ProxyConfig, use_uvloop: bool = True) -> None:
    """The `batchproxy serve` process: local replicas if none were given, then one proxy, or
    --workers forked proxies sharing the ports."""
    local: LocalReplicas | None = None
    replicas = list(config.replicas)
    if not replicas and not config.replicas_dns:
        local = LocalReplicas(config.local_replicas, config.local_replica_model,
                              config.model_name)
        replicas = local.start()
    try:
        if config.workers <= 1:
            run_loop(run(config, replicas), use_uvloop)
        else:
            workers.run_workers(config.workers,
                                lambda: run_loop(run(config, replicas), use_uvloop))
    finally:
        if local is not None:
            local.stop()
