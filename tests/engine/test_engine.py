"""The engine as a whole: its scheduler loop under the supervisor."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from scripted import ScriptedReplica, answer_values, make_call, make_engine

from batchproxy.engine.policy import FixedTimeoutPolicy, Flush, Hold
from batchproxy.engine.queues import KeyQueue
from batchproxy.errors import ProxyError
from batchproxy.supervisor import Supervisor


class FailsOnce(FixedTimeoutPolicy):
    """The fixed policy with one bug: its first decision raises."""

    failed = False

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        if not self.failed:
            self.failed = True
            raise RuntimeError("policy bug")
        return super().decide(queue, now)


def test_a_scheduler_that_dies_is_restarted_and_readiness_follows(vrun, caplog):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica})
        await engine.close()  # make_engine started it alone; run it supervised instead
        engine.scheduler.policy = FailsOnce(engine.config)
        seen: list[bool] = []
        supervisor = Supervisor(restart_delay_s=0.05)
        supervisor.on_change = lambda: seen.append(supervisor.healthy)
        engine.start(supervisor)
        loop = asyncio.get_running_loop()
        answer = await engine.submit(make_call(1))
        answered_at = loop.time()
        await supervisor.close()
        await engine.close()
        return answer, answered_at, seen

    answer, answered_at, seen = vrun(main())
    assert answer_values(answer) == [0.0]
    assert seen == [False, True]
    # The restart came 50 ms after the failure at t=0; the call was due by then and left
    # at once.
    assert abs(answered_at - (0.05 + 0.1)) < 1e-9
    assert "background task scheduler failed" in caplog.text


def test_a_call_submitted_after_close_is_refused_at_once(vrun):
    # With the scheduler's loop stopped nothing would take it out of a queue: it must not
    # wait there until some outer timeout cancels it.
    replicas = {"a": ScriptedReplica(cost_s=0.1)}

    async def main():
        engine = make_engine(replicas)
        await engine.close()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ProxyError) as err:
            await asyncio.wait_for(engine.submit(make_call(1)), 5.0)
        return err.value, loop.time() - started

    error, waited = vrun(main())
    assert error.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in error.message
    assert waited == 0.0


@pytest.mark.parametrize(("policy", "answered_at"), [("fixed", 0.12), ("adaptive", 0.1)])
def test_drain_returns_when_the_last_queued_row_is_answered_and_not_later(
        vrun, policy, answered_at):
    # Rows held for the batch timeout (the fixed rule; adaptive sends them at once to the
    # idle replica), then a 100 ms batch: drain ends exactly when the answer does, without
    # a poll in between.
    replicas = {"a": ScriptedReplica(cost_s=0.1)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, batch_timeout_micros=20_000,
                             policy=policy)
        loop = asyncio.get_running_loop()
        calls = [asyncio.ensure_future(engine.submit(make_call(1))) for _ in range(3)]
        await asyncio.sleep(0)
        started = loop.time()
        await engine.drain()
        drained = loop.time() - started
        assert all(call.done() for call in calls)
        await engine.close()
        return drained

    assert abs(vrun(main()) - answered_at) < 1e-6
