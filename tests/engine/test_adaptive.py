"""The adaptive policy in virtual time: staggered starts, finish-time routing around a slow
replica, a backlog that earns the slow replica work, and full batches that never wait."""

from __future__ import annotations

import asyncio
import itertools

from scripted import ScriptedReplica, answer_values, make_call, make_engine


def steady(engine, calls: int, every_s: float):
    async def run():
        tasks = []
        for _ in range(calls):
            tasks.append(asyncio.ensure_future(engine.submit(make_call(1))))
            await asyncio.sleep(every_s)
        return await asyncio.gather(*tasks)
    return run()


def starts_after(replicas: dict[str, ScriptedReplica], warm_s: float):
    return sorted((s.at, name, s.rows) for name, r in replicas.items() for s in r.sent
                  if s.at > warm_s)


def test_batch_starts_are_spaced_one_batch_time_over_the_replicas(vrun):
    # 4 replicas at 100 ms a batch, one call every 2 ms: once costs are learned, a batch
    # leaves every 25 ms, the replicas take turns, and each starts the moment it is free.
    replicas = {name: ScriptedReplica(cost_s=0.1) for name in "abcd"}

    async def main():
        engine = make_engine(replicas, max_batch_size=32, max_inflight=2,
                             max_enqueued_rows=640, policy="adaptive")
        await steady(engine, 1500, 0.002)
        await engine.close()

    vrun(main())
    starts = [s for s in starts_after(replicas, 1.0) if s[0] < 2.9]  # before arrivals end
    gaps = {round(b[0] - a[0], 9) for a, b in itertools.pairwise(starts)}
    assert gaps == {0.025}
    assert [name for _, name, _ in starts[:8]] == list("abcdabcd")
    assert all(12 <= rows <= 13 for _, _, rows in starts)


def test_a_slow_replica_gets_no_work_a_fast_one_finishes_sooner(vrun):
    replicas = {"fast": ScriptedReplica(cost_s=0.1), "slow": ScriptedReplica(cost_s=0.3)}

    async def main():
        engine = make_engine(replicas, max_batch_size=8, max_inflight=2,
                             policy="adaptive")
        answers = await steady(engine, 100, 0.05)
        await engine.close()
        return answers

    answers = vrun(main())
    assert all(answer_values(a) == [0.0] for a in answers)
    assert not [s for s in replicas["slow"].sent if s.at > 1.0]


def test_a_backlog_earns_the_slow_replica_the_batches_it_can_finish_first(vrun):
    # Fast: 4 rows per 100 ms (40/s); slow: 4 rows per 300 ms (13/s). 45 calls/s need both,
    # and every call is still answered in bounded time.
    replicas = {"fast": ScriptedReplica(cost_s=0.1), "slow": ScriptedReplica(cost_s=0.3)}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=2,
                             max_enqueued_rows=400, policy="adaptive")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await steady(engine, 450, 1 / 45)
        took = loop.time() - started
        await engine.close()
        return took

    took = vrun(main())
    assert len(replicas["slow"].sent) > 10
    assert took < 10 + 1.0  # 10 s of arrivals, then the queue is worked off at once


def test_a_full_batch_leaves_at_once_whatever_the_spacing(vrun):
    replicas = {name: ScriptedReplica(cost_s=0.1) for name in "ab"}

    async def main():
        engine = make_engine(replicas, max_batch_size=4, max_inflight=2,
                             policy="adaptive")
        first = [asyncio.ensure_future(engine.submit(make_call(1))) for _ in range(4)]
        await asyncio.sleep(0.001)
        await asyncio.gather(*first, *(engine.submit(make_call(1)) for _ in range(4)))
        await engine.close()

    vrun(main())
    # The second batch is full 1 ms after the first: it goes to the idle replica at once,
    # although the spacing alone would hold it for 50 ms.
    assert sorted((s.at, s.rows) for r in replicas.values() for s in r.sent) == [
        (0.0, 4), (0.001, 4)]
