"""The learned cost model: the fit converges, resists outliers, follows a change, and the
concurrency estimate finds replicas that run batches side by side."""

from __future__ import annotations

import random

import pytest

from batchproxy.fleet import costs
from batchproxy.fleet.costs import CostModel


def feed(model: CostModel, a: float, b: float, batches: int, seed: int = 0,
         noise: float = 0.02) -> None:
    rng = random.Random(seed)
    for _ in range(batches):
        rows = rng.randint(1, 32)
        model.observe(rows, (a + b * rows) * rng.uniform(1 - noise, 1 + noise))


def test_the_fit_converges_to_the_replica_cost():
    model = CostModel()
    feed(model, 0.100, 0.001, 300)
    assert model.a_s == pytest.approx(0.100, rel=0.03)
    assert model.b_s == pytest.approx(0.001, rel=0.1)
    assert model.predict(32) == pytest.approx(0.132, rel=0.02)


def test_before_any_batch_the_prior_holds_and_one_batch_sets_the_level():
    model = CostModel(prior_a_s=0.01)
    assert model.predict(8) == 0.01
    model.observe(8, 0.2)
    assert model.predict(8) == pytest.approx(0.2)


def test_outliers_are_clipped():
    model = CostModel()
    feed(model, 0.050, 0.0005, 100)
    for _ in range(3):  # a GC pause or two
        model.observe(16, 5.0)
    assert model.predict(16) == pytest.approx(0.058, rel=0.1)


def test_the_spread_reads_the_recent_noise_not_the_first_batches():
    model = CostModel()
    assert model.spread == 0.0
    for _ in range(costs.WARM):  # the first batches: a cold connection, then steady ones
        model.observe(16, 0.5 if model.batches == 0 else 0.116)
    feed(model, 0.100, 0.001, 200, noise=0.04)  # uniform +-4 %: mean absolute 2 %
    assert model.spread == pytest.approx(0.02, abs=0.006)
    assert model.to_dict()["spread"] == round(model.spread, 4)
    feed(model, 0.100, 0.001, 100, seed=1, noise=0.0)
    # Quiet again: within tens of batches only the fit's own lag is left.
    assert model.spread < 0.01


def test_the_fit_follows_a_replica_that_slows_down():
    model = CostModel()
    feed(model, 0.050, 0.0005, 200)
    feed(model, 0.150, 0.0015, 1500, seed=1)
    assert model.predict(16) == pytest.approx(0.174, rel=0.1)


def test_concurrency_is_found_from_batches_that_ran_side_by_side():
    serial, parallel = CostModel(), CostModel()
    for model in (serial, parallel):
        feed(model, 0.1, 0.0, 20)
    for _ in range(10):
        serial.observe(8, 0.2, beside=1)  # waited for the other batch: twice as long
        parallel.observe(8, 0.105, beside=1)  # ran beside it
        parallel.observe(8, 0.11, beside=2)
    assert serial.concurrency == 1
    assert parallel.concurrency == 3


def test_a_level_judged_too_slow_is_tried_again_after_enough_batches(monkeypatch):
    # Serial at first (a batch beside another takes twice as long); later it gains room.
    monkeypatch.setattr(costs, "REJUDGE_AFTER", 50)
    model = CostModel()
    feed(model, 0.1, 0.0, 20)
    for _ in range(costs.JUDGED_AFTER):
        assert model.untried_beside(1)
        model.observe(8, 0.2, beside=1)
    assert model.concurrency == 1 and not model.untried_beside(1)
    feed(model, 0.1, 0.0, 49, seed=1)
    assert not model.untried_beside(1)  # too soon
    feed(model, 0.1, 0.0, 1, seed=2)
    assert model.untried_beside(1)  # the old judgment is dropped
    for _ in range(costs.JUDGED_AFTER):
        model.observe(8, 0.105, beside=1)
    assert model.concurrency == 2
