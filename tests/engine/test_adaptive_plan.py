"""AdaptivePolicy._plan for a queue that fits one batch (its shortcut) picks what the
general list scheduling picks: the replica finishing first, the first of equals."""

from __future__ import annotations

import itertools
import math

from batchproxy.engine.policy import AdaptivePolicy


class Cost:
    def __init__(self, per_row: float, fixed: float) -> None:
        self.per_row = per_row
        self.fixed = fixed

    def predict(self, rows: int) -> float:
        return self.fixed + self.per_row * rows


def expected(rows: int, starts: list) -> tuple:
    finishes = [start + cost.predict(rows) for start, _, cost, _ in starts]
    return starts[min(range(len(starts)), key=finishes.__getitem__)]


def test_one_batch_picks_the_first_to_finish() -> None:
    costs = [Cost(0.001, 0.01), Cost(0.002, 0.005), Cost(0.0, 0.02), Cost(0.001, 0.01),
             Cost(math.inf, 0.0), Cost(math.nan, 0.0)]
    times = [0.0, 0.004, 0.01, 0.02]
    checked = 0
    for n in (1, 2, 3):
        for combo in itertools.product(range(len(costs)), range(len(times)), repeat=n):
            starts = [(times[combo[2 * i + 1]], f"r{i}", costs[combo[2 * i]], i % 2 == 0)
                      for i in range(n)]
            for rows in (1, 5, 8):
                first, used = AdaptivePolicy._plan(None, rows, starts, 8)  # type: ignore[arg-type]
                assert first is expected(rows, starts)
                assert used == [first]
                checked += 1
    assert checked > 1000
