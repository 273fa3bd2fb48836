"""The dispatcher in virtual time: retries, deadlines that belong to one caller only,
bisection and its bound, failures inside the proxy, unbatched calls and shutdown. What the
dispatcher does with a batch does not depend on when the policy sent it: most tests keep
the fixed rule (make_engine's), whose due times are exact; those that time a retry run
under both policies."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from scripted import (
    POLICIES,
    ScriptedReplica,
    answer_values,
    lone_call_sent_at,
    make_call,
    make_engine,
)

from batchproxy.errors import ProxyError
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.fleet.slots import ModelState, ReplicaState
from batchproxy.methods import GET_MODEL_METADATA

UNAVAILABLE = ProxyError(grpc.StatusCode.UNAVAILABLE, "connection refused")


async def outcome(coro):
    try:
        return await coro
    except ProxyError as err:
        return err


@pytest.mark.parametrize("policy", POLICIES)
def test_a_retry_with_nowhere_to_go_answers_instead_of_waiting_forever(vrun, policy):
    # The only other replica is ejected: no retry is worth waiting for. The caller (no
    # deadline) is answered with the replica's error, and close() does not hang.
    failing = ScriptedReplica(error=UNAVAILABLE)
    ejected = ScriptedReplica()

    async def main():
        engine = make_engine({"a": failing, "b": ejected}, policy=policy)
        pool = engine.pool
        pool._eject(pool.replicas["b"], "test")
        loop = asyncio.get_running_loop()
        result = await outcome(engine.submit(make_call(1)))
        answered_at = loop.time()
        await engine.close()
        return result, answered_at, pool.replicas["a"].outstanding

    result, answered_at, outstanding = vrun(main())
    assert isinstance(result, ProxyError) and result.code is grpc.StatusCode.UNAVAILABLE
    assert answered_at == lone_call_sent_at(policy)  # answered as the first attempt fails
    assert outstanding == 0
    assert not ejected.sent


def test_a_replica_failure_is_retried_on_another_replica(vrun):
    failing = ScriptedReplica(error=UNAVAILABLE)
    healthy = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": failing, "b": healthy})
        engine.pool.replicas["b"].outstanding = 1  # busy: the first batch goes to "a"
        first = asyncio.ensure_future(engine.submit(make_call(1)))
        await asyncio.sleep(0.01)
        engine.pool.release(engine.pool.replicas["b"])
        answer = await first
        await engine.close()
        return answer

    assert answer_values(vrun(main())) == [0.0]
    assert len(failing.sent) == 1 and len(healthy.sent) == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_the_retry_gets_the_time_left_not_the_time_before_the_failure(vrun, policy):
    slow_failure = ScriptedReplica(cost_s=0.6)
    healthy = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": slow_failure, "b": healthy}, policy=policy)
        engine.pool.replicas["b"].outstanding = 1  # the first attempt goes to "a"

        async def fail_after_cost(path, request, timeout):
            await asyncio.sleep(0.6)
            slow_failure.sent.append(None)  # type: ignore[arg-type]
            engine.pool.release(engine.pool.replicas["b"])
            raise UNAVAILABLE

        slow_failure.call = fail_after_cost  # type: ignore[method-assign]
        answer = await engine.submit(make_call(1), timeout=1.0)
        await engine.close()
        return answer

    assert answer_values(vrun(main())) == [0.0]
    (retry,) = healthy.sent
    failed_at = lone_call_sent_at(policy) + 0.6
    assert abs(retry.at - failed_at) < 1e-9
    assert abs(retry.timeout - (1.0 - failed_at)) < 1e-9


def test_no_caller_fails_with_another_callers_deadline(vrun):
    # A hung replica holds a batch of a 2 s-deadline call and a call with no deadline: the
    # first gets DEADLINE_EXCEEDED at 2 s; the second waits on, and when the replica is given
    # up on (the replica timeout, 5 s here) its rows are retried on the healthy replica.
    hung = ScriptedReplica(hung=True)
    healthy = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": hung, "b": healthy}, max_batch_size=2,
                             default_timeout_s=5.0)
        engine.pool.replicas["b"].outstanding = 1  # the batch goes to the hung replica
        loop = asyncio.get_running_loop()
        tight = asyncio.ensure_future(outcome(engine.submit(make_call([1.0]), timeout=2.0)))
        patient = asyncio.ensure_future(outcome(engine.submit(make_call([2.0]))))
        await asyncio.sleep(0.01)
        engine.pool.release(engine.pool.replicas["b"])
        tight_result = await tight
        tight_at = loop.time()
        patient_result = await patient
        patient_at = loop.time()
        await engine.close()
        return tight_result, tight_at, patient_result, patient_at, engine.pool

    tight, tight_at, patient, patient_at, pool = vrun(main())
    assert isinstance(tight, ProxyError) and tight.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert tight_at == 2.0
    assert answer_values(patient) == [2.0]
    assert abs(patient_at - 5.1) < 1e-9
    assert [s.values for s in healthy.sent] == [[2.0]]  # only the rows someone waits for
    assert pool.replicas["a"].consecutive_failures == 1


def test_without_a_retry_a_patient_caller_hears_unavailable_not_a_deadline(vrun):
    hung = ScriptedReplica(hung=True)

    async def main():
        engine = make_engine({"a": hung}, default_timeout_s=5.0)
        result = await outcome(engine.submit(make_call(1)))
        await engine.close()
        return result

    result = vrun(main())
    assert isinstance(result, ProxyError) and result.code is grpc.StatusCode.UNAVAILABLE
    assert "did not answer" in result.message


def test_thirty_two_uniformly_invalid_calls_cost_at_most_eight_replica_calls(vrun):
    replica = ScriptedReplica(cost_s=0.01)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=32, max_inflight=4,
                             batch_timeout_micros=50_000)
        results = await asyncio.gather(
            *(outcome(engine.submit(make_call([-1.0 - i]))) for i in range(32)))
        await engine.close()
        return results

    results = vrun(main())
    assert all(isinstance(r, ProxyError) and r.code is grpc.StatusCode.INVALID_ARGUMENT
               for r in results)
    assert len(replica.sent) <= 8


def test_an_unexpected_failure_answers_the_callers_and_frees_the_slot(vrun):
    broken = ScriptedReplica(error=RuntimeError("a bug"))

    async def main():
        engine = make_engine({"a": broken})
        result = await outcome(engine.submit(make_call(1)))
        outstanding = engine.pool.replicas["a"].outstanding
        await engine.close()
        return result, outstanding

    result, outstanding = vrun(main())
    assert isinstance(result, ProxyError) and result.code is grpc.StatusCode.INTERNAL
    assert outstanding == 0


def test_close_with_a_hung_replica_answers_everyone_within_the_grace(vrun):
    hung = ScriptedReplica(hung=True)

    async def main():
        engine = make_engine({"a": hung})
        loop = asyncio.get_running_loop()
        in_flight = asyncio.ensure_future(outcome(engine.submit(make_call(4))))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(outcome(engine.submit(make_call(1))))
        await asyncio.sleep(0.01)
        await engine.close(grace_s=1.0)
        return await in_flight, await queued, loop.time()

    in_flight, queued, closed_at = vrun(main())
    assert isinstance(in_flight, ProxyError)
    assert in_flight.code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(queued, ProxyError) and queued.code is grpc.StatusCode.UNAVAILABLE
    assert abs(closed_at - 1.02) < 1e-9


def test_forwarded_calls_are_admitted_under_a_bound_and_retried(vrun):
    hung = ScriptedReplica(hung=True)

    async def main():
        engine = make_engine({"a": hung}, max_forwarded_calls=1)
        first = asyncio.ensure_future(outcome(engine.forward(GET_MODEL_METADATA, b"", 1.0)))
        await asyncio.sleep(0)
        second = await outcome(engine.forward(GET_MODEL_METADATA, b"", 1.0))
        first_result = await first
        await engine.close()
        return first_result, second

    first, second = vrun(main())
    assert isinstance(second, ProxyError) and second.code is grpc.StatusCode.UNAVAILABLE
    assert "unbatched calls" in second.message
    assert isinstance(first, ProxyError)


def test_a_crashed_replica_is_ejected_after_repeated_failures(vrun):
    failing = ScriptedReplica(error=UNAVAILABLE)
    healthy = ScriptedReplica(cost_s=0.01)

    async def main():
        engine = make_engine({"a": failing, "b": healthy}, max_inflight=4)
        for _ in range(6):
            await outcome(engine.submit(make_call(1)))
        state = engine.pool.replicas["a"].state
        await engine.close()
        return state

    assert vrun(main()) is ReplicaState.EJECTED


@pytest.mark.parametrize("bad", [(3,), (3, 20), (0, 31)])
def test_bad_calls_fail_alone_and_their_batch_mates_are_answered(vrun, bad):
    replica = ScriptedReplica(cost_s=0.01)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=32, max_inflight=8,
                             batch_timeout_micros=50_000)
        values = [-1.0 if i in bad else float(i) for i in range(32)]
        results = await asyncio.gather(*(outcome(engine.submit(make_call([v])))
                                         for v in values))
        await engine.close()
        return values, results

    values, results = vrun(main())
    for value, result in zip(values, results, strict=True):
        if value < 0:
            assert isinstance(result, ProxyError)
            assert result.code is grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert answer_values(result) == [value]
    assert len(replica.sent) <= 1 + 6 * 5


def test_bisection_of_differently_failing_calls_is_bounded(vrun):
    replica = ScriptedReplica(cost_s=0.01)
    seen = []

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=32, max_inflight=8,
                             batch_timeout_micros=50_000)
        original = replica.call

        async def refuse_each_differently(path, request, timeout):
            seen.append(path)
            await original(path, request, timeout)
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT, f"bad batch {len(seen)}")

        replica.call = refuse_each_differently  # type: ignore[method-assign]
        results = await asyncio.gather(*(outcome(engine.submit(make_call([1.0])))
                                         for _ in range(32)))
        await engine.close()
        return results

    results = vrun(main())
    assert all(isinstance(r, ProxyError) for r in results)
    assert len(replica.sent) <= 1 + 6 * 5


def test_a_check_finding_the_model_missing_while_its_batch_is_out_still_lets_it_go_on(vrun):
    # The race of a fleet whose replicas serve different models: the first batch for "echo"
    # leaves for "a", which lacks it, and a health check marks "a" as lacking "echo" while
    # the batch is still out. Its NOT_FOUND must still send the batch on to "b".
    lacking = ScriptedReplica(cost_s=0.01, models={"m"})
    having = ScriptedReplica(cost_s=0.01, models={"echo"})

    async def main():
        engine = make_engine({"a": lacking, "b": having})
        checker = HealthChecker(engine.pool, 1.0)
        engine.pool.replicas["b"].outstanding = 1  # the first batch goes to "a"
        first = asyncio.ensure_future(outcome(engine.submit(make_call([5.0], model="echo"))))
        await asyncio.sleep(0.005)
        assert [s.values for s in lacking.sent] == [[5.0]]  # still there: answers at 12 ms
        await checker.check(engine.pool.replicas["a"])
        marked = engine.pool.replicas["a"].models.get("echo")
        engine.pool.release(engine.pool.replicas["b"])
        answer = await first
        await engine.close()
        return marked, answer

    marked, answer = vrun(main())
    assert marked is ModelState.MISSING
    assert not isinstance(answer, ProxyError), answer  # e.g. "a"'s NOT_FOUND
    assert answer_values(answer) == [5.0]
    assert [s.values for s in having.sent] == [[5.0]]


def test_a_batch_for_a_model_one_replica_lacks_goes_to_one_that_has_it(vrun):
    # No health check has asked about "echo" yet: the first replica tried may lack it. Its
    # NOT_FOUND marks it, and the batch goes to the other replica instead of failing.
    lacking = ScriptedReplica(cost_s=0.01, models={"m"})
    having = ScriptedReplica(cost_s=0.01, models={"echo"})

    async def main():
        engine = make_engine({"a": lacking, "b": having})
        engine.pool.replicas["b"].outstanding = 1  # the first batch goes to "a"
        first = asyncio.ensure_future(outcome(engine.submit(make_call([5.0], model="echo"))))
        await asyncio.sleep(0.005)
        engine.pool.release(engine.pool.replicas["b"])
        answer = await first
        nowhere = await outcome(engine.submit(make_call([1.0], model="nosuch")))
        await engine.close()
        return answer, nowhere

    answer, nowhere = vrun(main())
    assert answer_values(answer) == [5.0]
    assert len(lacking.sent) == 2 and len(having.sent) == 2  # "nosuch": each asked once
    assert isinstance(nowhere, ProxyError) and nowhere.code is grpc.StatusCode.NOT_FOUND
