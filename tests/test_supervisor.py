"""Supervisor: failed background tasks are logged, restarted and reported; close cancels."""

from __future__ import annotations

import asyncio
import logging

import pytest
from virtual_time import virtual

from batchproxy.supervisor import Supervisor, cancel_and_wait


class Flaky:
    """A loop body that fails its first `failures` runs, then runs until cancelled."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError(f"boom {self.runs}")
        self.running.set()
        await asyncio.Event().wait()


@virtual
async def test_a_failed_task_is_logged_restarted_and_reported(caplog):
    changes: list[bool] = []
    supervisor: Supervisor

    def changed() -> None:
        changes.append(supervisor.healthy)

    supervisor = Supervisor(on_change=changed, restart_delay_s=0.05)
    flaky = Flaky(failures=1)
    with caplog.at_level(logging.ERROR, logger="batchproxy.supervisor"):
        supervisor.spawn("loop", flaky.run)
        await asyncio.sleep(0.01)
        assert not supervisor.healthy  # dead, restart pending
        assert supervisor.failures == {"loop": "RuntimeError: boom 1"}
        assert "loop" in supervisor.reason()
        await asyncio.wait_for(flaky.running.wait(), 1)
    assert supervisor.healthy
    assert flaky.runs == 2
    assert changes == [False, True]
    failed = [r for r in caplog.records if "background task loop failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None  # logged with its traceback
    await supervisor.close()


@virtual
async def test_restart_waits_on_the_loop_clock():
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(restart_delay_s=0.2)
    flaky = Flaky(failures=1)
    started = loop.time()
    supervisor.spawn("loop", flaky.run)
    await asyncio.wait_for(flaky.running.wait(), 2)
    assert loop.time() - started == 0.2
    await supervisor.close()


@virtual
async def test_a_task_failing_too_often_is_given_up():
    given_up: list[str] = []
    supervisor = Supervisor(restart_delay_s=0.0, max_restarts=3, on_give_up=given_up.append)
    flaky = Flaky(failures=100)
    supervisor.spawn("doomed", flaky.run)
    await asyncio.sleep(1)
    assert given_up == ["doomed"]
    assert flaky.runs == 4  # the first run and three restarts
    assert not supervisor.healthy
    assert supervisor.given_up == {"doomed"}
    assert supervisor.names == []
    await supervisor.close()


@virtual
async def test_a_task_that_returns_is_not_restarted():
    supervisor = Supervisor(restart_delay_s=0.0)
    runs: list[int] = []

    async def once() -> None:
        runs.append(1)

    supervisor.spawn("once", once)
    await asyncio.sleep(0.01)
    assert runs == [1] and supervisor.healthy and supervisor.names == []
    await supervisor.close()


@virtual
async def test_names_are_unique_and_close_refuses_new_tasks():
    supervisor = Supervisor()
    supervisor.spawn("a", Flaky(0).run)
    with pytest.raises(ValueError):
        supervisor.spawn("a", Flaky(0).run)
    await supervisor.close()
    with pytest.raises(RuntimeError):
        supervisor.spawn("b", Flaky(0).run)


@virtual
async def test_close_cancels_every_task():
    supervisor = Supervisor()
    cancelled: list[str] = []

    def body(name: str):
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
        return run

    supervisor.spawn("a", body("a"))
    supervisor.spawn("b", body("b"))
    await asyncio.sleep(0)
    await supervisor.close()
    assert sorted(cancelled) == ["a", "b"]
    assert supervisor.names == []


@virtual
async def test_close_does_not_swallow_the_callers_cancellation():
    supervisor = Supervisor()
    release = asyncio.Event()

    async def stubborn() -> None:
        # Takes a while to stop: the caller of close() is cancelled while it waits.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()
            raise

    supervisor.spawn("stubborn", stubborn)
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(supervisor.close())
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    release.set()
    await asyncio.sleep(0.01)
    assert supervisor.names == []


@virtual
async def test_cancel_and_wait_propagates_the_callers_cancellation():
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    task = asyncio.ensure_future(slow_to_stop())
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(cancel_and_wait([task]))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await asyncio.wait([task])
    assert task.cancelled()
