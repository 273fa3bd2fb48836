"""Assembles a proxy process: replica pool, engine, predict service and frontends, the
supervised background tasks, and its orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from batchproxy import __version__, codec, ports, workers
from batchproxy.auth import TokenAuth
from batchproxy.config import ProxyConfig
from batchproxy.debug import debug_routes
from batchproxy.engine import Engine
from batchproxy.event_loop import run_loop
from batchproxy.fleet import shared_slots
from batchproxy.fleet.discovery import DnsDiscovery
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.fleet.slots import Endpoint, ReplicaPool, ReplicaState
from batchproxy.fleet.transport import grpc_transports
from batchproxy.fleet.versions import ModelSettings, VersionRouter
from batchproxy.fleet.warmup import SharedWarmingPool, WarmingPool, WarmupConfig
from batchproxy.frontends.grpc import PredictionHandlers, generic_handlers
from batchproxy.frontends.grpc_options import queue_limits
from batchproxy.frontends.limits import RequestLimits
from batchproxy.frontends.predict_service import PredictService
from batchproxy.frontends.rest import RestServer
from batchproxy.local_replicas import LocalReplicas
from batchproxy.metrics import GaugeSampler, ProxyMetrics
from batchproxy.model_config import ConfigFiles, ConfigReloader
from batchproxy.readiness import Readiness
from batchproxy.supervisor import Supervisor
from batchproxy.tls import ServerTLS, replica_credentials

log = logging.getLogger("batchproxy")

# After the drain, in-flight batches get this long to finish before they are cancelled (a
# hung replica must not hold the exit: SIGTERM exits within drain_timeout_s plus a little).
CLOSE_GRACE_S = 0.5
# The bound on each closing step after the drain: closing channels and servers.
CLOSE_STEP_S = 1.0
# The drain ends this long before the gRPC server's grace: the engine answers what is left.
ANSWER_MARGIN_S = 0.25
# How long the queue must stay empty before a stop takes the drain as done.
DRAIN_SETTLE_S = 0.05


class SupervisionFailed(RuntimeError):
    """A background task kept failing: the process exits non-zero so it is restarted."""


def log_state_change(replica: Endpoint, old: ReplicaState, reason: str) -> None:
    log.info("replica %s: %s -> %s (%s)", replica.address, old.value, replica.state.value,
             reason)


def server_options(config: ProxyConfig) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", -1), *queue_limits(config)]


class Proxy:
    def __init__(self, config: ProxyConfig, replicas: list[str],
                 on_give_up: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.tls = ServerTLS.from_tfs_file(config.ssl_config_file) \
            if config.ssl_config_file else None
        self.auth = TokenAuth.from_file(config.auth_token_file) \
            if config.auth_token_file else None
        self.supervisor = Supervisor(on_give_up=on_give_up)
        transports = grpc_transports(
            replica_credentials(config.replica_ca, config.replica_cert, config.replica_key),
            reconnect_backoff_ms=max(config.health_interval_ms, 100))
        # Replicas and new versions are warmed before real calls (fleet/warmup.py); with
        # --workers, over slots all the workers share (fleet/shared_slots.py).
        warmup = WarmupConfig(config.warmup, config.batching.max_batch_size,
                              config.warmup_requests_file, config.replica_timeout_s,
                              sizes_of=lambda model: self.engine.scheduler.batch_sizes(model))
        shared = shared_slots.pool_class() is not ReplicaPool
        pool = SharedWarmingPool if shared else WarmingPool
        self.pool: ReplicaPool = pool(
            replicas, config.max_inflight_per_replica, config.replica_timeout_s,
            eject_after_failures=config.eject_after_failures,
            ejection_base_s=max(config.health_interval_ms / 1000, 0.1),
            transports=transports, warmup=warmup,
            count=lambda model, outcome: self.metrics.warmup_call(model, outcome))
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
        self.readiness = Readiness(self.pool, self.supervisor)
        # A replica's speed, for the `share:F` policy, is judged at full batches.
        self.versions = VersionRouter(self.pool, batch_rows=config.batching.max_batch_size)
        # A bad file stops start-up here (ConfigError names its line).
        self.model_config = ConfigReloader(
            ConfigFiles(config.model_config_file, config.proxy_config_file,
                        batching=config.batching),
            self._apply_model_settings, config.model_config_file_poll_wait_seconds)
        self.engine = Engine(config.batching, self.pool, self.metrics, versions=self.versions)
        self.service = PredictService(
            self.engine, self.metrics, RequestLimits(config.max_rows_per_request,
                                                     config.max_rank))
        self.grpc_server = grpc.aio.server(
            options=[*server_options(config), ports.reuse_port_option(config.workers)])
        handlers = PredictionHandlers(self.service, auth=self.auth,
                                      reload=self.model_config.reload)
        self.grpc_server.add_generic_rpc_handlers(
            [*generic_handlers(handlers), self.readiness.grpc_handler()])
        address = f"{config.host}:{config.port}"
        try:
            if self.tls is not None:
                self.grpc_port = self.grpc_server.add_secure_port(address,
                                                                  self.tls.grpc_credentials())
            else:
                self.grpc_port = self.grpc_server.add_insecure_port(address)
        except RuntimeError as err:  # grpcio's "Failed to bind to address ..."
            raise ports.listen_error(config.host, config.port, "gRPC") from err
        # TFS's REST API on the same engine (rest_api_port 0 turns it off, as in TFS), with
        # the metrics routes TFS serves on its REST port.
        self.rest: RestServer | None = None
        if config.rest_api_port:
            self.rest = RestServer(
                self.service, config.host, config.rest_api_port,
                max_body_bytes=config.rest_max_body_bytes,
                extra_routes=self.metrics.routes() + self.readiness.routes()
                + debug_routes(self.pool, self.versions),
                reuse_port=config.workers > 1, shutdown_timeout_s=config.drain_timeout_s,
                auth=self.auth,
                ssl_context=self.tls.ssl_context() if self.tls is not None else None,
                header_timeout_s=config.rest_header_timeout_s,
                body_timeout_s=config.rest_body_timeout_s)

    def _apply_model_settings(self, settings: dict[str, ModelSettings]) -> None:
        """A (re)loaded config takes effect for the next call: the settings are swapped whole."""
        self.versions.settings = settings
        for model in settings:
            self.pool.note_model(model)
        self.health_checker.configured.update(settings)
        self.health_checker.check_soon()

    def _count_ejection(self, replica: Endpoint, old: ReplicaState, reason: str) -> None:
        if replica.state is ReplicaState.EJECTED and \
                not reason.startswith(shared_slots.EJECTED_ELSEWHERE):
            self.metrics.ejections.labels(replica.address).inc()

    def _sample_gauges(self) -> None:
        self.metrics.queued_rows.set(self.engine.queued_rows)
        self.metrics.turn.set(self.pool.turn.seconds)
        self.metrics.worker_calls.set(self.metrics.calls_handled)
        self.metrics.sample_replicas({
            replica.address: (replica.outstanding, replica.state is ReplicaState.HEALTHY)
            for replica in self.pool.replicas.values()})
        self.metrics.sample_costs({
            (replica.address, model): (cost.a_s, cost.b_s, cost.concurrency)
            for replica in self.pool.replicas.values()
            for model, cost in replica.costs.items()})
        self.metrics.sample_versions(self.versions.state_counts())

    async def _start_monitoring(self) -> None:
        """Metrics on a port of their own (--monitoring_port), e.g. bound to another address
        than the traffic ports."""
        app = web.Application()
        app.add_routes(self.metrics.routes() + self.readiness.routes()
                       + debug_routes(self.pool, self.versions))
        self.monitoring_runner = web.AppRunner(app, access_log=None)
        await self.monitoring_runner.setup()
        site = web.TCPSite(self.monitoring_runner, self.config.monitoring_host,
                           self.config.monitoring_port,
                           reuse_port=self.config.workers > 1 or None)
        try:
            await site.start()
        except OSError as err:
            raise ports.listen_error(self.config.monitoring_host, self.config.monitoring_port,
                                     "monitoring", err) from err

    async def start(self) -> None:
        supervisor = self.supervisor
        self.sampler.start(supervisor)
        if self.config.monitoring_port:
            await self._start_monitoring()
        if self.discovery is not None:
            await self.discovery.refresh()
            self.discovery.start(supervisor)
        self.health_checker.start(supervisor)
        if self.config.model_config_file_poll_wait_seconds > 0 and (
                self.config.model_config_file or self.config.proxy_config_file):
            supervisor.spawn("model_config_poll", self.model_config.run)
        self.engine.start(supervisor)
        await self.grpc_server.start()
        if self.rest is not None:
            self.rest.signatures.start(supervisor)
            try:
                await self.rest.start()
            except OSError as err:
                raise ports.listen_error(self.config.host, self.config.rest_api_port, "REST",
                                         err) from err

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, answer every accepted one (queued batches are flushed and
        in-flight batches finish), then close; all within `grace_s` plus a few bounded
        closing steps. Every step runs even when an earlier one fails (the first failure is
        raised at the end): a failing step must not leave ports or channels open."""
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        self.readiness.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace_s))
        rest_stopping = asyncio.ensure_future(self.rest.stop()) if self.rest else None

        async def drain() -> None:
            # Stop waiting a little before the gRPC server's grace ends, so calls still
            # held by a hung replica are answered UNAVAILABLE by the engine rather than
            # cancelled by the server.
            margin = min(ANSWER_MARGIN_S, grace_s / 4)

            async def until_settled() -> None:
                # A call the servers accepted just before they stopped taking new ones may
                # not have reached the queue yet when it first reads empty: look again
                # after a moment, so it is answered rather than met by a closed engine.
                while True:
                    await self.engine.drain()
                    await asyncio.sleep(DRAIN_SETTLE_S)
                    if self.engine.idle():
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until_settled(), max(grace_s - margin, 0.0))

        async def close_engine() -> None:
            # Whatever is still in flight after the drain (a hung replica) is cancelled and
            # its callers told the proxy is shutting down.
            grace = max(min(deadline - loop.time() - CLOSE_STEP_S, CLOSE_GRACE_S), 0.0)
            await bounded(self.engine.close(grace), grace + CLOSE_STEP_S, "engine")

        async def stop_frontends() -> None:
            try:
                await bounded(stopping, max(deadline - loop.time(), 0) + CLOSE_STEP_S,
                              "gRPC server")
            finally:
                if rest_stopping is not None:
                    await bounded(rest_stopping, max(deadline - loop.time(), 0)
                                  + CLOSE_STEP_S, "REST server")

        async def close_monitoring() -> None:
            if self.monitoring_runner is not None:
                await self.monitoring_runner.cleanup()

        async def close_discovery() -> None:
            if self.discovery is not None:
                await self.discovery.close()

        await run_all([
            drain,
            close_engine,
            stop_frontends,
            # every supervised loop: scheduler, checks, samplers
            lambda: bounded(self.supervisor.close(), CLOSE_STEP_S, "background tasks"),
            lambda: bounded(close_discovery(), CLOSE_STEP_S, "discovery"),
            lambda: bounded(self.health_checker.close(), CLOSE_STEP_S, "health checks"),
            lambda: bounded(self.sampler.close(), CLOSE_STEP_S, "gauge sampler"),
            lambda: bounded(close_monitoring(), CLOSE_STEP_S, "monitoring port"),
            lambda: bounded(self.pool.close(), CLOSE_STEP_S, "replica channels"),
        ])


async def bounded(step: Awaitable[None], timeout_s: float, what: str) -> None:
    """Await `step` for at most `timeout_s`; past that it is cancelled and the stop goes on.
    Not asyncio.wait_for: that waits for the cancelled step to finish, and a step stuck
    past its cancellation would hold the stop for ever."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        log.warning("stopping: %s did not close within %.1f s; going on", what, timeout_s)
        return
    task.result()


async def run_all(steps: list[Callable[[], Awaitable[object]]]) -> None:
    """Run `steps` in order, each as if in the `finally` of the one before: a step that
    raises is logged and the rest still run; the first failure is raised at the end."""
    first: BaseException | None = None
    for step in steps:
        try:
            await step()
        except Exception as err:
            log.exception("stopping: a step failed")
            first = first or err
        except BaseException as err:  # cancelled: finish closing, then propagate it
            first = first or err
    if first is not None:
        raise first


def banner(config: ProxyConfig, replicas: list[str], grpc_port: int) -> str:
    batching = config.batching
    return (
        f"batchproxy {__version__} core={codec.IMPLEMENTATION} grpc_port={grpc_port} "
        f"rest_api_port={config.rest_api_port} "
        f"replicas=[{', '.join(replicas)}] max_batch_size={batching.max_batch_size} "
        f"batch_timeout_micros={batching.batch_timeout_micros} "
        f"max_enqueued_rows={batching.max_enqueued_rows} "
        f"max_inflight_per_replica={config.max_inflight_per_replica}"
    )


# The young generation's collection threshold once serving (CPython's default is 700). A
# call allocates some hundred container objects (aiohttp's request and response, frames,
# futures, dicts), nearly all freed by reference counting when it ends; at 700 the collector
# runs every few calls and walks every call in flight each time.
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once started: what start-up built (modules, protobuf classes, grpc, aiohttp) lives as
    long as the process, so it moves out of the collector's sight (gc.freeze) and full
    collections no longer walk it; and the young generation is collected less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run(config: ProxyConfig, replicas: list[str]) -> None:
    """One proxy on this process's event loop until SIGTERM or SIGINT, then drain and exit.
    A background task that keeps failing stops it too, and raises SupervisionFailed."""
    stop = asyncio.Event()
    gave_up: list[str] = []

    def give_up(name: str) -> None:
        gave_up.append(name)
        stop.set()

    proxy = Proxy(config, replicas, on_give_up=give_up)
    try:
        await proxy.start()
    except BaseException:
        # A port taken after the start-up check: close what did start, then say why.
        with contextlib.suppress(Exception):
            await proxy.stop(0.0)
        raise
    log.info(banner(config, replicas, proxy.grpc_port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # As TFS re-reads its config on the poll, the proxy also re-reads it on SIGHUP.
    loop.add_signal_handler(signal.SIGHUP, proxy.model_config.reload_logged)
    settle_garbage_collector()  # after the handlers: a SIGTERM meanwhile still drains
    await stop.wait()
    if gave_up:
        log.error("stopping: background task %s kept failing", ", ".join(gave_up))
    log.info("stopping: draining queued and in-flight batches")
    await proxy.stop()
    if gave_up:
        raise SupervisionFailed(f"background task {', '.join(gave_up)} kept failing")


def serve(config: ProxyConfig, use_uvloop: bool = True) -> None:
    """The `batchproxy serve` process: local replicas if none were given, then one proxy, or
    --workers forked proxies sharing the ports."""
    # Before local replicas start or workers fork: a taken port is one line and exit 1.
    ports.check_free([("gRPC", config.host, config.port),
                      ("REST", config.host, config.rest_api_port),
                      ("monitoring", config.monitoring_host, config.monitoring_port)])
    local: LocalReplicas | None = None
    replicas = list(config.replicas)
    if not replicas and not config.replicas_dns:
        local = LocalReplicas(config.local_replicas, config.local_replica_model,
                              config.model_name)
        replicas = local.start()
    code = 0
    try:
        if config.workers <= 1:
            try:
                run_loop(run(config, replicas), use_uvloop)
            except SupervisionFailed as err:
                log.error("batchproxy exits: %s", err)
                code = 1
        else:
            # A worker that gave up exits 1 (workers.py); the parent exits with it.
            code = workers.run_workers(config.workers,
                                       lambda: run_loop(run(config, replicas), use_uvloop))
    finally:
        if local is not None:
            local.stop()
    if code:
        sys.exit(code)
