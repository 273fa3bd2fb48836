"""The engine: scheduler, dispatcher and admission put together behind one small API that
the frontends (through the predict service) and the simulator use."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine.admission import Admission
from batchproxy.engine.dispatcher import Dispatcher
from batchproxy.engine.policy import FlushPolicy, make_policy
from batchproxy.engine.queues import Entry
from batchproxy.engine.retry import RetryPolicy
from batchproxy.engine.scheduler import Scheduler
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.fleet.versions import VersionRouter
from batchproxy.metrics import ProxyMetrics
from batchproxy.priority import Priority

if TYPE_CHECKING:
    from batchproxy.supervisor import Supervisor


class Engine:
    def __init__(self, config: BatchingConfig, pool: ReplicaPool,
                 metrics: ProxyMetrics | None = None, *, policy: FlushPolicy | None = None,
                 retry: RetryPolicy | None = None,
                 versions: VersionRouter | None = None) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.admission = Admission(config, self.metrics, pool)
        self.dispatcher = Dispatcher(pool, self.admission, self.metrics,
                                     abandon=self._abandon, retry=retry,
                                     hedge_percent=config.hedge_percent,
                                     versions=versions)
        self.policy = policy or make_policy(config.policy, config, pool)
        self.admission.policy = self.policy
        self.scheduler = Scheduler(config, pool, self.policy, self.admission,
                                   self.dispatcher.dispatch, self.metrics, versions)
        self._task: asyncio.Task[None] | None = None
        self._supervisor: Supervisor | None = None

    def _abandon(self, entry: Entry) -> None:
        self.scheduler.abandon(entry)

    @property
    def queued_rows(self) -> int:
        return self.admission.queued_rows

    @property
    def queued_bytes(self) -> int:
        return self.admission.queued_bytes

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Run the scheduler loop: under `supervisor` (restarted if it dies), or alone."""
        self.scheduler.reopen()  # an engine closed and started again takes calls again
        if supervisor is not None:
            self._supervisor = supervisor
            supervisor.spawn("scheduler", self.scheduler.run)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.scheduler.run())

    def submit(self, call: codec.PredictCall, timeout: float | None = None,
               priority: Priority | None = None) -> Coroutine[Any, Any, bytes]:
        """A batchable call (call.rows >= 1): queued, batched, answered with its own rows.
        Critical calls go first; sheddable ones fill room and are shed first (None: the
        model's default class, critical unless its settings say otherwise). The scheduler's
        coroutine itself, counted there under its priority (no wrapper coroutine per call)."""
        return self.scheduler.submit(call, timeout, priority)

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes:
        """An unbatched call, under admission and the retry policy."""
        return await self.dispatcher.forward(path, request, timeout, model)

    async def drain(self) -> None:
        """Wait until every queued row has been sent and answered."""
        self.scheduler.wake()
        while self.admission.queued_rows or self.dispatcher.sending:
            # Rows leave on the scheduler's own timing (or when a slot frees, which is a
            # send ending): wake on whichever comes first, then look again.
            progress = self.scheduler.progress()
            await asyncio.wait({progress, *self.dispatcher.sending},
                               return_when=asyncio.FIRST_COMPLETED)
            progress.cancel()

    def idle(self) -> bool:
        """Nothing queued and nothing being sent."""
        return not (self.admission.queued_rows or self.dispatcher.sending)

    async def close(self, grace_s: float | None = None) -> None:
        """Stop taking batches; in-flight batches get `grace_s` to finish (then their callers
        hear the proxy is shutting down); calls still queued are refused."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await self.dispatcher.close(grace_s)
        self.scheduler.close(ProxyError(grpc.StatusCode.UNAVAILABLE,
                                        "batchproxy is shutting down"))
