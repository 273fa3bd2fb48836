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
from batchproxy.frontend_grpc import PredictionHandlers, generic_handlers
from batchproxy.local_replicas import LocalReplicas
from batchproxy.pool import UNLIMITED_MESSAGES, ReplicaPool

log = logging.getLogger("batchproxy")


class Proxy:
    def __init__(self, config: ProxyConfig, replicas: list[str]) -> None:
        self.config = config
        self.pool = ReplicaPool(replicas, config.max_inflight_per_replica,
                                config.replica_timeout_s)
        self.batcher = Batcher(config.batching, self.pool)
        self.grpc_server = grpc.aio.server(options=UNLIMITED_MESSAGES)
        self.grpc_server.add_generic_rpc_handlers(
            generic_handlers(PredictionHandlers(self.batcher, self.pool)))
        self.grpc_port = self.grpc_server.add_insecure_port(f"{config.host}:{config.port}")

    async def start(self) -> None:
        self.batcher.start()
        await self.grpc_server.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        # Refuse new calls first, then let queued and in-flight batches finish.
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.drain(), grace_s)
        await stopping
        await self.batcher.close()
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
    if not replicas:
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
