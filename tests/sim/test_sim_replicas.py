"""Simulated replicas: exact costs, queueing, deadlines, faults, and the Transport they
offer the fleet (identity answers, GetModelStatus, the real health checks)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from batchproxy import codec
from batchproxy.errors import ProxyError
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.fleet.slots import ReplicaPool, ReplicaState
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2, predict_pb2
from batchproxy.sim.clock import run_virtual
from batchproxy.sim.faults import Fault, FaultSchedule, parse_fault
from batchproxy.sim.replicas import Cost, SimReplica, sleep_until
from batchproxy.sim.workloads import predict_request

COST = Cost(0.010, 0.001)  # 10 ms a batch + 1 ms a row


def replica(concurrency: int = 1, faults: tuple[Fault, ...] = (), **kwargs) -> SimReplica:
    return SimReplica("r0", 0, {}, COST, concurrency=concurrency,
                      faults=FaultSchedule(list(faults)), models=frozenset({"m"}), **kwargs)


async def timed(coro) -> tuple[float, str]:
    """(virtual time it ended, OK or the error's code name)."""
    try:
        await coro
        code = "OK"
    except ProxyError as err:
        code = err.code.name
    return asyncio.get_running_loop().time(), code


def results(r: SimReplica, calls: list[tuple[float, int, float | None]]):
    """Each (start time, rows, timeout) as a call to `r.serve`; their (end, code)."""

    async def one(start: float, rows: int, timeout: float | None):
        await sleep_until(start)
        return await timed(r.serve("m", rows, timeout))

    async def main():
        return await asyncio.gather(*(one(*c) for c in calls))

    return run_virtual(main())


def approx(values):
    return pytest.approx(values, abs=1e-12)


def test_a_serial_replica_serves_first_come_first_served():
    r = replica()
    out = results(r, [(0.0, 1, None), (0.0, 4, None), (0.001, 2, None)])
    assert [t for t, _ in out] == approx([0.011, 0.025, 0.037])
    assert {code for _, code in out} == {"OK"}
    assert dict(r.record.batch_rows) == {1: 1, 4: 1, 2: 1}
    assert r.record.busy_s == pytest.approx(0.037)


def test_k_at_a_time():
    r = replica(concurrency=2)
    out = results(r, [(0.0, 1, None), (0.0, 1, None), (0.0, 1, None)])
    assert [t for t, _ in out] == approx([0.011, 0.011, 0.022])


def test_speed_factor_scales_the_cost():
    out = results(replica(speed=3.0), [(0.0, 10, None)])
    assert out[0][0] == pytest.approx(0.060)


def test_a_deadline_ends_the_call_but_not_the_work():
    r = replica()
    # The first call's 20 ms of work outlives its 5 ms deadline: the slot stays busy, so
    # the second call (arriving at 1 ms) starts only at 20 ms.
    out = results(r, [(0.0, 10, 0.005), (0.001, 1, None)])
    assert out == [(pytest.approx(0.005), "DEADLINE_EXCEEDED"), (approx(0.031), "OK")]


def test_a_call_expiring_in_the_queue_costs_nothing():
    r = replica()
    out = results(r, [(0.0, 10, None), (0.0, 1, 0.005), (0.0, 1, None)])
    assert out[1] == (pytest.approx(0.005), "DEADLINE_EXCEEDED")
    assert out[2][0] == pytest.approx(0.031)
    assert sum(r.record.batch_rows.values()) == 2


def test_crash_refuses_calls_and_fails_the_work_in_progress():
    r = replica(faults=(parse_fault("crash:0:0.015-0.050"),))
    out = results(r, [(0.0, 10, None), (0.020, 1, None), (0.050, 1, None)])
    assert out == [(pytest.approx(0.015), "UNAVAILABLE"), (pytest.approx(0.020), "UNAVAILABLE"),
                   (approx(0.061), "OK")]


def test_hang_holds_answers_until_it_ends_or_the_deadline():
    r = replica(faults=(parse_fault("hang:0:0.005-1.0"),))
    out = results(r, [(0.0, 1, None), (0.1, 1, 0.5), (0.2, 1, None)])
    # Work done at 11 ms is answered when the hang ends; a call arriving during the hang
    # waits for its end, or fails at its deadline.
    assert out == [(approx(1.0), "OK"), (approx(0.6), "DEADLINE_EXCEEDED"),
                   (approx(1.011), "OK")]


def test_slow_applies_to_work_started_inside_its_interval():
    r = replica(faults=(parse_fault("slow:0:0.010-0.020:4"),))
    out = results(r, [(0.0, 1, None), (0.0, 1, None), (0.1, 1, None)])
    assert [t for t, _ in out] == approx([0.011, 0.011 + 0.044, 0.111])


def test_error_rate_is_seeded():
    def codes(seed: int) -> list[str]:
        r = replica(faults=(parse_fault("errors:0:0-10:0.5"),), seed=seed)
        return [code for _, code in results(r, [(i * 0.1, 1, None) for i in range(40)])]

    first = codes(1)
    assert first == codes(1)
    assert 5 < first.count("UNAVAILABLE") < 35
    assert first != codes(2)


def test_jitter_has_mean_one_and_is_seeded():
    r = replica(jitter=0.3, seed=5)
    costs = [r.cost_s("m", 0, 0.0) for _ in range(4000)]
    assert np.mean(costs) == pytest.approx(0.010, rel=0.03)
    assert np.std(costs) / np.mean(costs) == pytest.approx(0.3, rel=0.1)
    again = replica(jitter=0.3, seed=5)
    assert [again.cost_s("m", 0, 0.0) for _ in range(10)] == costs[:10]


def test_predict_over_the_transport_echoes_the_inputs():
    r = replica()
    request = predict_request("m", 3, 2)

    async def main():
        return await timed_response(r.call(PREDICT, request, 5.0))

    async def timed_response(coro):
        data = await coro
        return asyncio.get_running_loop().time(), data

    t, data = run_virtual(main())
    assert t == pytest.approx(0.013)
    response = predict_pb2.PredictResponse.FromString(data)
    assert response.model_spec.name == "m"
    sent = predict_pb2.PredictRequest.FromString(request).inputs["x"]
    assert response.outputs["x"].tensor_content == sent.tensor_content
    assert [d.size for d in response.outputs["x"].tensor_shape.dim] == [3, 2]
    # The proxy can cut it: the codec splits it by rows.
    assert len(codec.split_predict_response(data, [1, 2])) == 2


def test_the_network_round_trip_is_paid_half_each_way_and_counts_against_the_timeout():
    # 13 ms of work and a 4 ms round trip: answered at 17 ms, the replica busy from 2 ms.
    r = replica(network_s=0.004)
    request = predict_request("m", 3, 2)

    async def main():
        answered = await timed(r.call(PREDICT, request, 5.0))
        late = await timed(r.call(PREDICT, request, 0.014))
        return answered, late

    (answered_at, code), (late_at, late_code) = run_virtual(main())
    assert (answered_at, code) == (pytest.approx(0.017), "OK")
    # 14 ms of patience: 2 ms go on the way there, and the 13 ms of work do not fit in 12.
    assert late_code == "DEADLINE_EXCEEDED"
    assert late_at == pytest.approx(0.017 + 0.014)


def test_model_status_and_unknown_models():
    r = replica()

    def status_request(model: str) -> bytes:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        return request.SerializeToString()

    async def main():
        answer = await r.call(GET_MODEL_STATUS, status_request("m"), 1.0)
        with pytest.raises(ProxyError) as missing:
            await r.call(GET_MODEL_STATUS, status_request("other"), 1.0)
        with pytest.raises(ProxyError) as predict_missing:
            await r.call(PREDICT, predict_request("other", 1, 1), 1.0)
        return answer, missing.value.code, predict_missing.value.code

    answer, missing, predict_missing = run_virtual(main())
    status = get_model_status_pb2.GetModelStatusResponse.FromString(answer)
    assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert missing == predict_missing == grpc.StatusCode.NOT_FOUND


def test_the_fleet_health_checks_follow_a_crash():
    replicas = {f"r{i}": SimReplica(f"r{i}", i, {}, COST, models=frozenset({"m"}),
                                    faults=FaultSchedule.for_replica(
                                        [parse_fault("crash:1:2.5-4.5")], i))
                for i in range(2)}

    async def main():
        pool = ReplicaPool(list(replicas), transports=replicas.__getitem__, seed=0,
                           ejection_base_s=0.5)
        checker = HealthChecker(pool, interval_s=1.0, models=("m",))
        checker.start()
        states = []
        for t in (0.5, 3.5, 6.5):
            await sleep_until(t)
            states.append([pool.replicas[a].state for a in replicas])
        await checker.close()
        return states

    healthy, ejected = ReplicaState.HEALTHY, ReplicaState.EJECTED
    assert run_virtual(main()) == [[healthy, healthy], [healthy, ejected], [healthy, healthy]]


def test_fault_specs():
    assert parse_fault("slow:*:1-2:3") == Fault("slow", None, 1.0, 2.0, 3.0)
    assert parse_fault("crash:4:0-1.5") == Fault("crash", 4, 0.0, 1.5)
    for bad in ("crash:0", "slow:0:1-2", "melt:0:1-2", "crash:0:2-1", "errors:0:0-1:2"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    chained = FaultSchedule([Fault("hang", 0, 1, 2), Fault("hang", 0, 2, 3)])
    assert chained.hang_end(1.5) == 3
    assert chained.hang_end(3) is None
