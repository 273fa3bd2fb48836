"""Allowed batch sizes in virtual time: what each padding policy sends, exactly. Replica
"a" runs any batch in 100 ms, one at a time; max batch 8, allowed sizes 4 and 8."""

from __future__ import annotations

import asyncio

import pytest
from scripted import ScriptedReplica, answer_values, make_call, make_engine

from batchproxy.config import BatchingConfig
from batchproxy.engine.padding import Padding, batch_down_size, pad_up_size, padding_for
from batchproxy.fleet.costs import CostModel

SIZES = (4, 8)


def test_sizes_up_and_down():
    assert [pad_up_size(SIZES, n) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert [batch_down_size(SIZES, n) for n in (3, 4, 7, 8)] == [None, 4, 4, 8]
    assert [padding_for(SIZES, n) for n in (0, 1, 4, 6)] == [0, 3, 0, 2]
    assert padding_for((), 5) == 0


@pytest.mark.parametrize(("policy", "queued", "a", "b", "room"), [
    ("pad_up", 6, 0.01, 0.0, 8),
    ("batch_down", 6, 0.01, 0.0, 4),
    ("batch_down", 3, 0.01, 0.0, 8),   # below the smallest size: padding is the only way
    ("batch_down", 4, 0.01, 0.0, 8),   # an exact fit takes what there is
    ("batch_down", 20, 0.01, 0.0, 8),  # a full batch is a full batch
    # Fixed cost dominant: 8 rows cost about what 4 do, so padding 6 up is cheaper per row.
    ("min_cost", 6, 0.1, 0.0001, 8),
    # Per-row cost dominant: padding 6 to 8 wastes a third; batching down to 4 costs less.
    ("min_cost", 6, 0.001, 0.01, 4),
])
def test_room_by_policy(policy, queued, a, b, room):
    padding = Padding(BatchingConfig(max_batch_size=8, allowed_batch_sizes=SIZES,
                                     padding_policy=policy))
    assert padding.room(queued, learned(a, b)) == room


def learned(a: float, b: float) -> CostModel:
    """A cost model that has seen batches of 4 and 8 rows costing a + b * rows."""
    cost = CostModel()
    for i in range(20):
        rows = 4 if i % 2 else 8
        cost.observe(rows, a + b * rows)
    assert cost.slope_known
    return cost


def test_min_cost_alternates_until_the_slope_is_known():
    padding = Padding(BatchingConfig(max_batch_size=8, allowed_batch_sizes=SIZES,
                                     padding_policy="min_cost"))
    unknown = CostModel(prior_a_s=0.01, prior_b_s=0.0)
    assert [padding.room(6, unknown) for _ in range(4)] == [4, 8, 4, 8]


def run_six_rows(vrun, policy: str, cost: CostModel | None = None):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=8, allowed_batch_sizes=SIZES,
                             padding_policy=policy, max_enqueued_rows=64)
        if cost is not None:
            engine.pool.replicas["a"].costs["m"] = cost
        answers = await asyncio.gather(
            *(engine.submit(make_call([10.0 * i + 1, 10.0 * i + 2])) for i in range(3)))
        await engine.close()
        return answers

    answers = vrun(main())
    for i, answer in enumerate(answers):  # every caller gets its own rows, no padding
        assert answer_values(answer) == [10.0 * i + 1, 10.0 * i + 2]
    return [(round(s.at, 6), s.rows, s.values) for s in replica.sent]


def test_pad_up_sends_one_batch_of_eight(vrun):
    sent = run_six_rows(vrun, "pad_up")
    # Six real rows padded with two copies of the last one.
    assert sent == [(0.002, 8, [1.0, 2.0, 11.0, 12.0, 21.0, 22.0, 22.0, 22.0])]


def test_batch_down_sends_four_and_keeps_the_rest_queued(vrun):
    sent = run_six_rows(vrun, "batch_down")
    # Four rows at the due time; the two left wait for the replica, then pad up to 4.
    assert sent == [(0.002, 4, [1.0, 2.0, 11.0, 12.0]),
                    (0.102, 4, [21.0, 22.0, 22.0, 22.0])]


def test_min_cost_follows_the_replicas_learned_cost(vrun):
    per_row = run_six_rows(vrun, "min_cost", learned(0.001, 0.01))
    assert [rows for _, rows, _ in per_row] == [4, 4]
    fixed = run_six_rows(vrun, "min_cost", learned(0.1, 0.0001))
    assert [rows for _, rows, _ in fixed] == [8]


def test_a_bisected_batch_pads_each_half(vrun):
    # A poisoned batch is bisected; each half goes out padded to an allowed size too.
    replica = ScriptedReplica(cost_s=0.01)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=8, allowed_batch_sizes=SIZES)
        results = await asyncio.gather(engine.submit(make_call([1.0, 2.0, 3.0])),
                                       engine.submit(make_call([-1.0])),
                                       return_exceptions=True)
        await engine.close()
        return results

    good, bad = vrun(main())
    assert answer_values(good) == [1.0, 2.0, 3.0]
    assert isinstance(bad, Exception)
    assert all(s.rows in SIZES for s in replica.sent)


def test_padding_rows_are_counted_per_replica(vrun):
    replica = ScriptedReplica(cost_s=0.1)

    async def main():
        engine = make_engine({"a": replica}, max_batch_size=8, allowed_batch_sizes=SIZES)
        await asyncio.gather(*(engine.submit(make_call(1)) for _ in range(5)))
        await engine.close()
        return engine.metrics.registry

    registry = vrun(main())
    assert registry.get_sample_value("batchproxy_batch_padding_rows_sum",
                                     {"replica": "a"}) == 3.0
    assert registry.get_sample_value("batchproxy_batch_padding_rows_count",
                                     {"replica": "a"}) == 1.0
