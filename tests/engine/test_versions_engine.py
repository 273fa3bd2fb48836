"""Versions across a fleet, in virtual time: a call naming a version goes only where it is
AVAILABLE, labels resolve in the proxy, `latest` follows the model's policy and canary
weights, a version rolled back before the health checks noticed costs no call, and a shadow
version is compared without reaching callers. `share:F` counts capacity (a fast replica
counts for more); a version no replica holds is refused at once, one still loading is
waited for within the caller's deadline, and a canary weight on an absent version gives its
share to the policy's version."""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass, field

import grpc
import pytest
from scripted import ScriptedReplica, answer_values, make_call, make_pool

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.errors import ProxyError
from batchproxy.fleet.costs import WARM
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.fleet.versions import (
    CAPACITY_TTL_S,
    SPEED_STALE_S,
    LatestPolicy,
    ModelSettings,
    ShadowSettings,
    VersionRouter,
)
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2, predict_pb2

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
LOADING = get_model_status_pb2.ModelVersionStatus.LOADING


@dataclass
class VersionedReplica(ScriptedReplica):
    """Serves model "m" at the versions in `versions` (version -> state); answers with the
    version that computed the batch, scaled by `scale[version]` so versions differ."""

    versions: dict[int, int] = field(default_factory=lambda: {1: AVAILABLE})
    scale: dict[int, float] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)  # the version of each batch

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == GET_MODEL_STATUS:
            status = get_model_status_pb2.GetModelStatusResponse()
            for version, state in sorted(self.versions.items()):
                status.model_version_status.add(version=version, state=state)
            return status.SerializeToString()
        assert path == PREDICT
        message = predict_pb2.PredictRequest.FromString(request)
        spec = message.model_spec
        available = [v for v, s in self.versions.items() if s == AVAILABLE]
        version = spec.version.value if spec.HasField("version") else max(available)
        if version not in available:
            raise ProxyError(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Specific(m, {version})")
        self.batches.append(version)
        await asyncio.sleep(self.cost_s)
        call = codec.decode_predict_request(request)
        x = call.inputs["x"]
        assert isinstance(x.data, bytes)
        factor = self.scale.get(version, 1.0)
        values = [v * factor for v in memoryview(x.data).cast("f")]
        data = struct.pack(f"<{len(values)}f", *values)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = "m"
        response.model_spec.version.value = version
        outputs = {"x": codec.encode_tensor(x.dtype, x.shape, data, True)}
        return codec.encode_predict_response(outputs, response.model_spec.SerializeToString())


def version_of(response: bytes) -> int:
    return predict_pb2.PredictResponse.FromString(response).model_spec.version.value


async def fleet(replicas: dict[str, VersionedReplica],
                settings: dict[str, ModelSettings] | None = None,
                max_inflight: int = 2) -> tuple[Engine, HealthChecker, VersionRouter]:
    pool = make_pool(replicas, max_inflight)  # type: ignore[arg-type]
    router = VersionRouter(pool, settings, seed=7)
    checker = HealthChecker(pool, 1.0, ("m",))
    await checker.check_all()
    # The fixed rule: it sends a lone call to any idle replica, so one call at a time times
    # every replica (test_share_counts_capacity...); the adaptive policy sends each to the
    # one expected to finish first and never learns the slower ones' speed from that load.
    engine = Engine(BatchingConfig(max_batch_size=8, batch_timeout_micros=1000,
                                   policy="fixed"), pool, versions=router)
    engine.start()
    return engine, checker, router


def test_latest_is_the_highest_available_and_named_versions_go_where_they_are(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE})
    b = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: LOADING})

    async def main():
        engine, checker, _ = await fleet({"a": a, "b": b})
        answers = await asyncio.gather(*(engine.submit(make_call(2)) for _ in range(20)))
        assert {version_of(r) for r in answers} == {1}
        b.versions[2] = AVAILABLE  # version 2 appears on one replica
        await checker.check_all()
        answers = await asyncio.gather(*(engine.submit(make_call(2)) for _ in range(20)))
        assert {version_of(r) for r in answers} == {2}
        assert all(answer_values(r) == [0.0, 1.0] for r in answers)
        one = make_call(2)
        one.version = 1
        one.key = (one.model_name, 1, *one.key[2:])
        assert version_of(await engine.submit(one)) == 1
        await engine.close()

    vrun(main())
    assert set(a.batches) == {1}  # a never held version 2: nothing for 2 went there


def test_share_policy_waits_for_the_share_of_capacity(vrun):
    replicas = {name: VersionedReplica(cost_s=0.01) for name in "abcd"}
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("share:0.5"))}

    async def main():
        engine, checker, _ = await fleet(replicas, settings)
        replicas["a"].versions[2] = AVAILABLE
        await checker.check_all()
        first = await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(16)))
        replicas["b"].versions[2] = AVAILABLE  # now on half the fleet
        await checker.check_all()
        second = await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(16)))
        await engine.close()
        return first, second

    first, second = vrun(main())
    assert {version_of(r) for r in first} == {1}
    assert {version_of(r) for r in second} == {2}


def test_labels_resolve_in_the_proxy_and_an_unknown_one_is_refused(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: AVAILABLE})
    settings = {"m": ModelSettings(labels={"stable": 1, "canary": 2})}

    async def main():
        engine, _, _ = await fleet({"a": a}, settings)
        stable, canary = make_call(1), make_call(1)
        stable.version_label, canary.version_label = "stable", "canary"
        assert version_of(await engine.submit(stable)) == 1
        assert version_of(await engine.submit(canary)) == 2
        bad = make_call(1)
        bad.version_label = "nope"
        with pytest.raises(ProxyError) as raised:
            await engine.submit(bad)
        await engine.close()
        return raised.value

    error = vrun(main())
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "Unrecognized servable version label: nope"


def test_a_canary_weight_draws_its_share_of_latest_calls_and_no_batch_mixes(vrun):
    replicas = {name: VersionedReplica(cost_s=0.005, versions={1: AVAILABLE, 2: AVAILABLE})
                for name in "abc"}
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("pinned:1"), weights={2: 10.0})}

    async def main():
        engine, _, _ = await fleet(replicas, settings)
        versions = []
        for _ in range(20):
            answers = await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(100)))
            versions += [version_of(r) for r in answers]
        await engine.close()
        return versions

    versions = vrun(main())
    assert len(versions) == 2000
    assert abs(versions.count(2) / 2000 - 0.10) <= 0.02


def test_a_version_rolled_back_before_the_checks_noticed_costs_no_call(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: AVAILABLE})
    b = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: AVAILABLE})

    async def main():
        engine, _, router = await fleet({"a": a, "b": b})
        assert router.resolve_latest("m") == 2
        del a.versions[2], b.versions[2]  # removed; no health check has run yet
        answers = await asyncio.gather(*(engine.submit(make_call(2)) for _ in range(20)))
        await engine.close()
        return answers

    answers = vrun(main())
    assert {version_of(r) for r in answers} == {1}


def test_a_latest_batch_refused_moves_to_the_old_version_on_the_same_replica(vrun):
    # One replica lists both versions; version 2 goes before a check notices. The batch
    # moves to version 1, which only the replica that refused version 2 holds: it goes
    # back there rather than failing for want of another replica.
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: AVAILABLE})

    async def main():
        engine, _, router = await fleet({"a": a})
        assert router.resolve_latest("m") == 2
        del a.versions[2]
        answers = await asyncio.gather(*(engine.submit(make_call(2)) for _ in range(5)))
        await engine.close()
        return answers

    answers = vrun(main())
    assert {version_of(r) for r in answers} == {1}
    assert a.batches and set(a.batches) == {1}


def test_a_shadow_version_is_compared_and_never_answers_a_caller(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: AVAILABLE},
                         scale={2: 1.5})
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("pinned:1"),
                                   shadow=ShadowSettings(2, sample=1.0, max_inflight=1))}

    async def main():
        engine, _, _ = await fleet({"a": a}, settings)
        answers = await asyncio.gather(*(engine.submit(make_call(4)) for _ in range(12)))
        await asyncio.sleep(1.0)  # shadow copies finish
        await engine.close()
        return answers, engine.metrics

    answers, metrics = vrun(main())
    assert {version_of(r) for r in answers} == {1}
    assert all(answer_values(r) == [0.0, 1.0, 2.0, 3.0] for r in answers)
    registry = metrics.registry
    compared = registry.get_sample_value("batchproxy_shadow_batches_total",
                                         {"model": "m", "outcome": "compared"})
    assert compared and compared >= 1
    assert 2 in a.batches
    count = registry.get_sample_value("batchproxy_shadow_max_abs_difference_count",
                                      {"model": "m"})
    assert count == compared
    # 3 * 0.5 is the largest difference: in the bucket up to 10, not below 1.
    below_one = registry.get_sample_value("batchproxy_shadow_max_abs_difference_bucket",
                                          {"model": "m", "le": "1.0"})
    assert below_one == 0
    assert not math.isnan(compared)


def test_a_models_own_latency_objective_governs_its_admission(vrun):
    a = VersionedReplica(cost_s=0.1)
    settings = {"m": ModelSettings(latency_slo_ms=50.0)}

    async def main():
        engine, _, _ = await fleet({"a": a}, settings, max_inflight=1)
        await engine.submit(make_call(1))  # a batch timed: admission can estimate
        # Another model, with no objective of its own (and none by flag), queues freely.
        queued = [asyncio.ensure_future(engine.submit(make_call(8, model="n")))
                  for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(ProxyError) as raised:
            await engine.submit(make_call(8))
        served = asyncio.ensure_future(engine.submit(make_call(8, model="n")))
        await asyncio.gather(*queued, served)
        await engine.close()
        return raised.value

    error = vrun(main())
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert "latency objective" in error.message


def test_share_counts_capacity_so_a_fast_replica_counts_for_more(vrun):
    # a answers a batch in 10 ms, b and c in 40 ms: version 2 on a alone is a third of the
    # replicas but two thirds of the capacity (100 batches/s of 150), once speeds are learned.
    replicas = {"a": VersionedReplica(cost_s=0.01), "b": VersionedReplica(cost_s=0.04),
                "c": VersionedReplica(cost_s=0.04)}
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("share:0.5"))}

    async def main():
        engine, checker, router = await fleet(replicas, settings, max_inflight=1)
        replicas["a"].versions[2] = AVAILABLE
        await checker.check_all()
        before = router.resolve_latest("m")  # no speed learned yet: replicas count alike
        pool = router.pool
        for _ in range(300):  # one call at a time: each batch runs alone and is timed
            await engine.submit(make_call(1))
            if all(r.costs.get("m") is not None and r.costs["m"].warm
                   for r in pool.replicas.values()):
                break
        await asyncio.sleep(CAPACITY_TTL_S)  # the capacity view is counted again
        after = router.resolve_latest("m")
        for replica in replicas.values():
            replica.batches.clear()
        answers = await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(16)))
        await engine.close()
        return before, after, answers

    before, after, answers = vrun(main())
    assert (before, after) == (1, 2)
    assert {version_of(r) for r in answers} == {2}
    assert replicas["b"].batches == replicas["c"].batches == []  # they hold only version 1


def test_a_speed_no_batch_timed_lately_counts_as_the_mean_of_the_others(vrun):
    # a and b hold version 2, c version 1 only; all answer in 10 ms now. b's only batches,
    # long ago, were slow (40 ms): trusted still, version 2 would hold 125 of 225 batches/s
    # (0.56, under share:0.6). Untimed for SPEED_STALE_S, b counts as the mean: two thirds.
    both = {1: AVAILABLE, 2: AVAILABLE}
    replicas = {"a": VersionedReplica(cost_s=0.01, versions=dict(both)),
                "b": VersionedReplica(cost_s=0.01, versions=dict(both)),
                "c": VersionedReplica(cost_s=0.01)}
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("share:0.6"))}

    async def main():
        engine, checker, router = await fleet(replicas, settings)
        pool = router.pool

        def timed(name: str, seconds: float) -> None:
            for _ in range(WARM + 1):  # a replica's first batch is not learned
                pool.note_answered(pool.replicas[name], "m", 1, seconds, 0)

        timed("b", 0.04)
        await asyncio.sleep(SPEED_STALE_S)
        timed("a", 0.01)
        timed("c", 0.01)
        await asyncio.sleep(CAPACITY_TTL_S)
        await checker.check_all()
        stale = router.resolve_latest("m")
        timed("b", 0.04)  # timed again, still slow: it counts as it is
        await asyncio.sleep(CAPACITY_TTL_S)
        slow = router.resolve_latest("m")
        await engine.close()
        return stale, slow

    assert vrun(main()) == (2, 1)


def test_a_version_no_replica_holds_is_refused_at_once(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE})
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("pinned:3"),
                                   labels={"stable": 1, "canary": 3})}

    async def main():
        engine, _, _ = await fleet({"a": a}, settings)
        loop = asyncio.get_running_loop()
        errors = []
        for how in ("pinned", "label", "named"):
            call = make_call(1)
            if how == "label":
                call.version_label = "canary"
            elif how == "named":
                call.version = 3
                call.key = (call.model_name, 3, *call.key[2:])
            start = loop.time()
            with pytest.raises(ProxyError) as raised:
                await engine.submit(call, timeout=5.0)
            errors.append((raised.value, loop.time() - start))
        await engine.close()
        return errors

    (pinned, t1), (label, t2), (named, t3) = vrun(main())
    assert max(t1, t2, t3) < 0.001  # at once, not at the deadline
    assert pinned.code is label.code is grpc.StatusCode.UNAVAILABLE
    assert "Version 3 of model 'm'" in pinned.message and "pinned" in pinned.message
    assert "Version 3 of model 'm'" in label.message and "label 'canary'" in label.message
    # A version the caller named itself gets TFS's own answer, from the proxy.
    assert named.code is grpc.StatusCode.NOT_FOUND
    assert named.message == "Servable not found for request: Specific(m, 3)"
    assert a.batches == []


def test_calls_for_a_loading_version_wait_for_it_within_their_deadline(vrun):
    a = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE})
    b = VersionedReplica(cost_s=0.01, versions={1: AVAILABLE, 2: LOADING})
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("pinned:2"))}

    async def main():
        engine, checker, _ = await fleet({"a": a, "b": b}, settings)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ProxyError) as raised:
            await engine.submit(make_call(1), timeout=0.3)
        expired = loop.time() - start
        start = loop.time()
        waiting = asyncio.ensure_future(engine.submit(make_call(1), timeout=5.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        b.versions[2] = AVAILABLE
        await checker.check_all()
        answer = await waiting
        answered = loop.time() - start
        await engine.close()
        return raised.value, expired, answer, answered

    error, expired, answer, answered = vrun(main())
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= expired < 0.31  # at its deadline, not after
    assert version_of(answer) == 2
    assert 0.2 <= answered < 0.25
    assert a.batches == []


def test_a_canary_weight_on_a_version_no_replica_holds_goes_to_the_policys(vrun):
    a = VersionedReplica(cost_s=0.005, versions={1: AVAILABLE, 3: AVAILABLE})
    # Version 2 is on no replica: its 50 % goes to the pinned version, not to version 3.
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("pinned:1"),
                                   weights={2: 50.0, 3: 20.0})}

    async def main():
        engine, _, _ = await fleet({"a": a}, settings)
        versions = []
        for _ in range(10):
            answers = await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(100)))
            versions += [version_of(r) for r in answers]
        await engine.close()
        return versions

    versions = vrun(main())
    assert len(versions) == 1000
    assert set(versions) == {1, 3}
    assert abs(versions.count(3) / 1000 - 0.20) <= 0.04
