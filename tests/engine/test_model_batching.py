"""Per-model batching in virtual time: models with their own max_batch_size, batch timeout,
allowed sizes, variable-length inputs and default priority share one engine, each batched
by its own settings; a reload changes them for calls queued after it, while calls already
queued leave under the settings they were queued under, never in a batch with newer ones."""

from __future__ import annotations

import asyncio

from scripted import ScriptedReplica, answer_values, make_call, make_pool

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.fleet.versions import ModelSettings, VersionRouter
from batchproxy.model_config import combine, parse_proxy_config
from batchproxy.priority import Priority
from batchproxy.protos import predict_pb2, tensor_pb2

# The flags: batches of 8 at most, 2 ms timeout. The fixed rule, whose per-model due times
# (each model's own batch timeout) these tests time exactly.
FLAGS = BatchingConfig(max_batch_size=8, batch_timeout_micros=2000, max_enqueued_rows=64,
                       policy="fixed")

CONFIG = """
[models.a.batching]
max_batch_size = 4
batch_timeout_micros = 10000

[models.b]
batching = { allowed_batch_sizes = [2, 4] }   # max_batch_size 4, the last allowed size

[models.s]
priority = "sheddable"

[models.v.batching]
variable_length_inputs = { x = 0 }
length_following_outputs = { x = "1=x" }
"""


def settings(text: str = CONFIG) -> dict[str, ModelSettings]:
    return combine({}, parse_proxy_config(text, "proxy.toml", FLAGS))


def engine_for(replicas: dict[str, ScriptedReplica], config: dict[str, ModelSettings],
               max_inflight: int = 1) -> tuple[Engine, VersionRouter]:
    pool = make_pool(replicas, max_inflight)
    router = VersionRouter(pool, config)
    engine = Engine(FLAGS, pool, versions=router)
    engine.start()
    return engine, router


def replicas(count: int, cost_s: float = 0.001) -> dict[str, ScriptedReplica]:
    return {f"r{i}": ScriptedReplica(cost_s=cost_s) for i in range(count)}


def batches(fleet: dict[str, ScriptedReplica]) -> list[tuple[float, int, list[float]]]:
    """(time sent, rows, the distinct values) of every batch any replica got, by time."""
    sent = [(round(s.at, 6), s.rows, sorted(set(s.values)))
            for replica in fleet.values() for s in replica.sent]
    return sorted(sent)


def test_each_model_batches_by_its_own_settings(vrun):
    # a: batches of 4, 10 ms timeout; b: allowed sizes 2 and 4 (3 rows are padded to 4);
    # c has no settings: the flags' 8 rows and 2 ms.
    fleet = replicas(6)

    async def main():
        engine, _ = engine_for(fleet, settings())
        calls = ([engine.submit(make_call([float(i)], "a")) for i in range(5)]
                 + [engine.submit(make_call([10.0 + i], "b")) for i in range(3)]
                 + [engine.submit(make_call([20.0 + i], "c")) for i in range(3)])
        answers = await asyncio.gather(*calls)
        await engine.close()
        return answers

    answers = vrun(main())
    assert [answer_values(a) for a in answers] == [
        [0.0], [1.0], [2.0], [3.0], [4.0], [10.0], [11.0], [12.0], [20.0], [21.0], [22.0]]
    assert batches(fleet) == [
        (0.0, 4, [0.0, 1.0, 2.0, 3.0]),          # a's full batch of 4 leaves at once
        (0.002, 3, [20.0, 21.0, 22.0]),          # c: the flags' timeout, no padding
        (0.002, 4, [10.0, 11.0, 12.0]),          # b: padded to the allowed size 4
        (0.01, 1, [4.0]),                        # a's last row: its own 10 ms timeout
    ]


def test_a_reload_applies_to_calls_queued_after_it(vrun):
    # Two rows of `a` wait under max 4 / 10 ms; the reload makes it max 2 / 1 ms. The two
    # rows queued after it fill a batch of 2 at once; the two before still leave at 10 ms,
    # on their own: a batch never mixes the two settings.
    fleet = replicas(4)

    async def main():
        engine, router = engine_for(fleet, settings())
        loop = asyncio.get_running_loop()
        before = [loop.create_task(engine.submit(make_call([float(i)], "a")))
                  for i in range(2)]
        await asyncio.sleep(0.001)
        router.settings = settings(CONFIG.replace("max_batch_size = 4", "max_batch_size = 2")
                                   .replace("10000", "1000"))
        after = [loop.create_task(engine.submit(make_call([10.0 + i], "a")))
                 for i in range(2)]
        answers = await asyncio.gather(*before, *after)
        assert engine.scheduler.batching_of("a").full == 2
        await engine.close()
        return answers

    answers = vrun(main())
    assert [answer_values(a) for a in answers] == [[0.0], [1.0], [10.0], [11.0]]
    assert batches(fleet) == [(0.001, 2, [10.0, 11.0]), (0.01, 2, [0.0, 1.0])]


def test_a_reload_that_leaves_a_model_as_it_was_keeps_its_queue(vrun):
    fleet = replicas(2)

    async def main():
        engine, router = engine_for(fleet, settings())
        loop = asyncio.get_running_loop()
        first = loop.create_task(engine.submit(make_call([1.0], "a")))
        await asyncio.sleep(0.001)
        kept = engine.scheduler.batching_of("a")
        router.settings = settings()  # the same file read again
        assert engine.scheduler.batching_of("a") is kept
        second = loop.create_task(engine.submit(make_call([2.0], "a")))
        await asyncio.gather(first, second)
        await engine.close()

    vrun(main())
    assert batches(fleet) == [(0.01, 2, [1.0, 2.0])]  # one batch, at the first call's time


def test_lookups_are_kept_per_model_until_a_reload():
    pool = make_pool(replicas(1))
    router = VersionRouter(pool, settings())
    engine = Engine(FLAGS, pool, versions=router)
    scheduler = engine.scheduler
    a = scheduler.batching_of("a")
    assert scheduler.batching_of("a") is a
    assert (a.full, a.timeout_s) == (4, 0.01)
    assert scheduler.batching_of("nobody") is scheduler.batching.default
    assert scheduler.batching_of("c") is scheduler.batching.default
    assert list(scheduler.batch_sizes("b")) == [2, 4]
    assert list(scheduler.batch_sizes("a")) == [1, 2, 3, 4]
    assert list(scheduler.batch_sizes("c")) == list(range(1, 9))
    assert scheduler.batching_of("s").priority is Priority.SHEDDABLE
    router.settings = {}
    assert scheduler.batching_of("a") is scheduler.batching.default


def test_a_models_default_priority_applies_to_calls_that_name_none(vrun):
    fleet = replicas(1)

    async def main():
        engine, _ = engine_for(fleet, settings())
        counted: list[tuple[str, str]] = []
        engine.metrics.observe_priority = lambda *labels: counted.append(labels)
        loop = asyncio.get_running_loop()
        shed = loop.create_task(engine.submit(make_call([1.0], "s")))
        own = loop.create_task(engine.submit(make_call([2.0], "s"), None, Priority.CRITICAL))
        other = loop.create_task(engine.submit(make_call([3.0], "c")))
        await asyncio.sleep(0)
        sheddable = engine.admission.sheddable_rows
        await asyncio.gather(shed, own, other)
        await engine.close()
        return sheddable, counted

    sheddable, counted = vrun(main())
    assert sheddable == 1  # only s's call without a priority of its own
    assert sorted(counted) == [("critical", "OK"), ("critical", "OK"), ("sheddable", "OK")]


def long_call(model: str, values: list[float]) -> codec.PredictCall:
    """One row whose input x is [1, len(values)]: a length that differs per call."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    tensor = tensor_pb2.TensorProto(dtype=1)
    tensor.tensor_shape.dim.add(size=1)
    tensor.tensor_shape.dim.add(size=len(values))
    tensor.float_val.extend(values)
    request.inputs["x"].CopyFrom(tensor)
    return codec.decode_predict_request(request.SerializeToString())


def test_a_variable_length_model_next_to_a_fixed_one(vrun):
    # v pads calls of lengths 2 and 3 into one batch and cuts each answer back; c, without
    # variable-length settings, sends the two lengths in batches of their own.
    fleet = replicas(4)

    async def main():
        engine, _ = engine_for(fleet, settings())
        answers = await asyncio.gather(
            engine.submit(long_call("v", [1.0, 2.0])),
            engine.submit(long_call("v", [3.0, 4.0, 5.0])),
            engine.submit(long_call("c", [6.0, 7.0])),
            engine.submit(long_call("c", [8.0, 9.0, 10.0])))
        await engine.close()
        return answers

    answers = vrun(main())
    assert [answer_values(a) for a in answers] == [
        [1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0], [8.0, 9.0, 10.0]]
    sent = batches(fleet)
    assert (0.002, 2, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) in sent  # v: padded with 0
    assert (0.002, 1, [6.0, 7.0]) in sent and (0.002, 1, [8.0, 9.0, 10.0]) in sent
    assert len(sent) == 3
