"""Owns the proxy's background tasks (scheduler loop, health checks, discovery, samplers).

A supervised task that raises is logged with its traceback, counted as a failure (readiness
turns false while it is down) and restarted after a short delay. A task that keeps failing
is given up on: `on_give_up` lets the server exit non-zero, so that whatever runs the process
(Kubernetes, systemd) restarts it whole instead of leaving a proxy that is quietly broken.

Every wait reads the running loop's clock, so supervision behaves the same on the
simulator's virtual-clock loop. Imports nothing of ours: any layer may use it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# Restarts are counted over this many seconds: a task that failed five times in a day is
# unlucky, one that fails five times a minute is broken.
DEFAULT_RESTART_WINDOW_S = 60.0


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they have finished.

    Unlike `with suppress(CancelledError): await task`, this never swallows a cancellation
    aimed at the *calling* task: asyncio.wait() does not raise the tasks' own outcomes, so
    a CancelledError coming out of it can only be the caller's, and it propagates."""
    tasks = list(tasks)
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        # Retrieve outcomes so asyncio does not log "exception was never retrieved".
        if task.done() and not task.cancelled():
            task.exception()


class Supervisor:
    def __init__(self, on_change: Callable[[], None] | None = None,
                 restart_delay_s: float = 0.1, max_restarts: int = 5,
                 on_give_up: Callable[[str], None] | None = None) -> None:
        self.on_change = on_change
        self.restart_delay_s = restart_delay_s
        self.max_restarts = max_restarts
        self.on_give_up = on_give_up
        self.restart_window_s = DEFAULT_RESTART_WINDOW_S
        self.failures: dict[str, str] = {}  # name -> the last error, for logs and /readyz
        self.given_up: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()  # failed, waiting for its restart
        self._restarts: dict[str, collections.deque[float]] = {}
        self._closed = False

    @property
    def healthy(self) -> bool:
        """False while a supervised task is dead and not yet restarted, or given up."""
        return not self._down and not self.given_up

    def reason(self) -> str:
        """Which tasks are down and why (for /readyz); "" when healthy."""
        names = sorted(self._down | self.given_up)
        return "; ".join(f"{name}: {self.failures.get(name, 'failed')}" for name in names)

    @property
    def names(self) -> list[str]:
        """The tasks running or waiting for a restart."""
        return sorted(self._tasks)

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run `factory()` as a supervised task named `name` (one task per name). A factory,
        not a coroutine: each restart needs a fresh coroutine."""
        if self._closed:
            raise RuntimeError(f"cannot spawn {name!r}: the supervisor is closed")
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        task = asyncio.get_running_loop().create_task(self._supervise(name, factory),
                                                      name=f"supervised:{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._tasks.pop(name, None))

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        restarts = self._restarts.setdefault(name, collections.deque())
        while True:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.exception("background task %s failed", name)
                self.failures[name] = f"{type(err).__name__}: {err}"
            else:
                log.debug("background task %s finished", name)
                return
            now = loop.time()
            while restarts and now - restarts[0] > self.restart_window_s:
                restarts.popleft()
            if len(restarts) >= self.max_restarts:
                log.error("background task %s failed %d times within %.0f s; giving up",
                          name, len(restarts) + 1, self.restart_window_s)
                self.given_up.add(name)
                self._changed()
                if self.on_give_up is not None:
                    self.on_give_up(name)
                return
            restarts.append(now)
            self._down.add(name)
            self._changed()
            try:
                await asyncio.sleep(self.restart_delay_s)
            finally:
                self._down.discard(name)
            log.info("restarting background task %s", name)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a listener's bug must not take supervision down with it
                log.exception("supervisor on_change listener failed")

    async def close(self) -> None:
        """Cancel every supervised task and wait for them to finish. The caller's own
        cancellation propagates."""
        self._closed = True
        await cancel_and_wait(list(self._tasks.values()))
