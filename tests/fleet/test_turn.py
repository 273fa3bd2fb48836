"""The proxy's turn between a replica's answer and its next send: both parts measured, a
longer turn followed within a few samples and a shorter one slowly, and on a real event loop
the turn a busy loop takes is what is measured."""

from __future__ import annotations

import asyncio
import time

import pytest

from batchproxy.fleet.turn import TurnLag
from batchproxy.sim.clock import run_virtual


def test_an_answer_is_timed_to_the_next_pass_and_a_pass_to_the_send():
    turn = TurnLag()
    turn.answered(10.0)
    turn.answered(10.002)  # a second answer before the pass: the oldest counts
    turn.looked(10.008)
    turn.sending(10.009)
    # Each part moved a quarter of the way from zero to its sample.
    assert turn.seconds == pytest.approx(0.25 * 0.008 + 0.25 * 0.001)


def test_a_pass_with_no_answer_before_it_teaches_nothing_of_the_answer_part():
    turn = TurnLag()
    turn.looked(1.0)  # woken by a call, a timer: no replica waited for this pass
    turn.looked(5.0)
    assert turn.seconds == 0.0


def test_a_longer_turn_is_followed_fast_and_a_shorter_one_slowly():
    turn = TurnLag()
    now = 0.0
    for _ in range(12):
        now += 1.0
        turn.answered(now)
        turn.looked(now + 0.008)
    assert turn.seconds == pytest.approx(0.008, rel=0.05)
    for _ in range(12):
        now += 1.0
        turn.answered(now)
        turn.looked(now)
    # Twelve passes with no turn at all take off less than half of it: a lead a little
    # long costs a few rows, one too short an idle replica.
    assert 0.004 < turn.seconds < 0.008


def test_on_the_virtual_clock_the_turn_is_zero():
    async def main():
        turn = TurnLag()
        loop = asyncio.get_running_loop()
        for _ in range(5):
            turn.answered(loop.time())
            await asyncio.sleep(0)
            turn.looked(loop.time())
            await asyncio.sleep(0)
            turn.sending(loop.time())
        return turn.seconds

    assert run_virtual(main()) == 0.0


def test_a_loop_busy_with_other_work_is_measured():
    # A real loop: the answer wakes a pass that runs only after 20 tasks ready before it,
    # each holding the loop 1 ms (callers writing their answers).
    async def main():
        turn = TurnLag()
        loop = asyncio.get_running_loop()

        async def caller() -> None:
            started = time.perf_counter()
            while time.perf_counter() - started < 0.001:
                pass

        async def scheduler_pass() -> None:
            turn.looked(loop.time())

        turn.answered(loop.time())
        callers = [asyncio.ensure_future(caller()) for _ in range(20)]
        await asyncio.gather(*callers, asyncio.ensure_future(scheduler_pass()))
        return turn.seconds

    # 20 ms of others' work, a quarter of it taken in: at least that, however busy.
    assert asyncio.run(main()) >= 0.25 * 0.020
