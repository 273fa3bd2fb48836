"""The virtual clock: time moves only when the loop would wait, by exactly that much."""

from __future__ import annotations

import asyncio

import pytest

from batchproxy.sim.clock import DeadlockError, VirtualEventLoop, run_virtual
from batchproxy.sim.replicas import sleep_until


def test_time_starts_at_zero_and_jumps_to_each_timer():
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualEventLoop)
        seen = [loop.time()]
        await sleep_until(10.0)
        seen.append(loop.time())
        await sleep_until(10.25)
        seen.append(loop.time())
        return seen

    assert run_virtual(main()) == [0.0, 10.0, 10.25]


def test_timers_fire_in_order_at_their_own_times():
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        for name, when in (("c", 3.0), ("a", 1.0), ("b", 2.0)):
            loop.call_at(when, lambda n=name: fired.append((n, loop.time())))
        await sleep_until(5.0)
        return fired

    assert run_virtual(main()) == [("a", 1.0), ("b", 2.0), ("c", 3.0)]


def test_asyncio_primitives_run_on_virtual_time():
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.create_future(), 2.5)
        after_wait_for = loop.time()
        await asyncio.gather(asyncio.sleep(1), asyncio.sleep(3), asyncio.sleep(2))
        return after_wait_for, loop.time()

    after_wait_for, end = run_virtual(main())
    assert after_wait_for == 2.5
    assert end == pytest.approx(5.5, abs=1e-12)


def test_a_million_virtual_seconds_pass_without_sleeping():
    async def main() -> float:
        for step in range(1, 1001):
            await sleep_until(step * 1000.0)
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == 1_000_000.0


def test_a_loop_that_can_never_wake_is_a_deadlock():
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(DeadlockError, match=r"virtual time 0\.000000s"):
        run_virtual(main())


def test_each_run_starts_a_fresh_clock():
    async def main() -> float:
        await asyncio.sleep(7)
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == 7.0
    assert run_virtual(main()) == 7.0
