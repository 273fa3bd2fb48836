"""Learned replica costs: per replica and model, an online fit of a batch's latency as
`a + b * rows`, and an estimate of how many batches the replica runs at once without
slowing down. The adaptive flush policy plans with them; metrics and the debug endpoint show
them.

The fit is weighted least squares over exponentially decaying sums, so a replica that slows
down (a noisy neighbour, thermal throttling) is followed within a few hundred batches.
Outliers (a GC pause, one slow batch) are clipped to a few times the typical residual before
they enter the sums. Until enough batches of different sizes were seen, the slope leans on a
prior and the intercept on the mean."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Weight of the past per new batch: 1 / (1 - DECAY) = 200 batches of memory.
DECAY = 0.995
# Residuals beyond this many times the typical absolute residual are clipped.
CLIP = 4.0
# Batches seen before the fit is trusted over the prior.
WARM = 8
# A batch that ran beside k others and took under this much longer than alone still counts
# as running concurrently.
CONCURRENT_SLOWDOWN = 1.3
# Weight of each batch in the spread (the typical residual as a share of the prediction): a
# memory of about 20 batches, so that it reads the replica's noise now, not the first
# batches' (a cold connection, a first call at a new size).
SPREAD_WEIGHT = 0.05
# Batches timed beside k others before level k + 1 of concurrency is judged.
JUDGED_AFTER = 4
# Batches timed alone after a level was judged to slow the replica down before it may be
# tried again: a replica that gains room later (a neighbour's job ends, a driver or model
# change) is found out, at JUDGED_AFTER probes per this many batches.
REJUDGE_AFTER = 1000


@dataclass
class CostModel:
    """What one replica costs for one model."""

    prior_a_s: float = 0.01  # before any batch: a guess of the fixed cost
    prior_b_s: float = 0.0  # and of the per-row cost
    max_concurrency: int = 8
    # Decaying sums for the weighted least-squares fit of latency on rows.
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _abs_residual: float = 0.0  # decaying mean absolute residual: the clip scale
    _spread: float = 0.0  # recent mean absolute residual over the prediction, once warm
    batches: int = 0
    # Slowdown (observed / predicted alone) by how many other batches ran beside it.
    _slowdown: dict[int, list[float]] = field(default_factory=dict)
    # By level: `batches` when that level was judged to slow the replica down.
    _judged_slow_at: dict[int, int] = field(default_factory=dict)
    # What the policy reads on every decision, kept current by observe() rather than
    # recomputed per question: the fit (None: not yet computed) and the concurrency.
    _fitted: tuple[float, float] | None = None
    _concurrency: int = 1
    # Loop time of the last batch timed here (set by the pool): how current the fit is.
    timed_at: float = -math.inf
    # Whether the pool saw a first batch answered here (fleet/slots.py note_answered).
    first_seen: bool = False

    @property
    def a_s(self) -> float:
        return self._fit()[0]

    @property
    def b_s(self) -> float:
        return self._fit()[1]

    @property
    def slope_known(self) -> bool:
        """Whether the per-row part is fitted from batches of different sizes rather than
        taken from the prior (a replica sent one size only cannot tell it)."""
        if self.batches < WARM:
            return False
        mean_x = self._x / self._w
        return self._xx / self._w - mean_x * mean_x >= 0.25

    def _fit(self) -> tuple[float, float]:
        if self._fitted is None:
            self._fitted = self._solve()
        return self._fitted

    def _solve(self) -> tuple[float, float]:
        if self.batches == 0:
            return self.prior_a_s, self.prior_b_s
        mean_x = self._x / self._w
        mean_y = self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        cov = self._xy / self._w - mean_x * mean_y
        # Rows that barely vary say nothing of the slope: lean on the prior until they do.
        settled = self.batches >= WARM and var_x >= 0.25
        b = max(cov / var_x, 0.0) if settled else self.prior_b_s
        a = max(mean_y - b * mean_x, 0.0)
        return a, b

    @property
    def warm(self) -> bool:
        """Whether enough batches were timed for the fit to be trusted over the prior."""
        return self.batches >= WARM

    @property
    def spread(self) -> float:
        """How far from the fit a batch's time typically falls lately, as a share of the
        prediction (the recent mean absolute residual): the replica's noise as the proxy
        sees it, its own turn and the trip included. 0 until the fit is warm."""
        return self._spread

    def predict(self, rows: int) -> float:
        """Expected seconds for a batch of `rows` rows on its own."""
        a, b = self._fit()
        return a + b * rows

    def observe(self, rows: int, seconds: float, beside: int = 0) -> None:
        """A batch of `rows` took `seconds`, with `beside` other batches in flight on the
        same replica when it started."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        alone = self.predict(rows)
        if beside:
            if self.batches >= WARM and alone > 0:
                ratios = self._slowdown.setdefault(min(beside, self.max_concurrency), [])
                ratios.append(seconds / alone)
                del ratios[:-32]  # the recent ones
                self._concurrency = self._solve_concurrency()
                level = min(beside, self.max_concurrency)
                if len(ratios) >= JUDGED_AFTER and self._concurrency <= level:
                    self._judged_slow_at.setdefault(level, self.batches)
            return  # only batches that ran alone teach the single-batch cost
        if self.batches >= WARM and self._abs_residual > 0:
            limit = CLIP * self._abs_residual
            seconds = min(max(seconds, alone - limit), alone + limit)
        residual = abs(seconds - alone) if self.batches else 0.0
        self._w = self._w * DECAY + 1.0
        self._x = self._x * DECAY + rows
        self._y = self._y * DECAY + seconds
        self._xx = self._xx * DECAY + rows * rows
        self._xy = self._xy * DECAY + rows * seconds
        if self.batches >= WARM:
            self._abs_residual += (1 - DECAY) * (residual - self._abs_residual)
            if alone > 0:
                self._spread += SPREAD_WEIGHT * (residual / alone - self._spread)
        else:  # few batches: the widest residual yet, so early clipping is lenient
            self._abs_residual = max(self._abs_residual, residual)
        self.batches += 1
        self._fitted = None

    def untried_beside(self, beside: int) -> bool:
        """Whether a batch sent beside `beside` others would test a level of concurrency
        not yet judged: the next one above what is known, with too few batches timed
        there to tell. A policy that sends only to a replica that can start at once
        never learns a concurrency above 1 without such probes. A level judged to slow the
        replica down is open to probes again once REJUDGE_AFTER batches have been timed
        since: asking then drops the old judgment."""
        if not self.warm or beside != self._concurrency or beside >= self.max_concurrency:
            return False
        judged_at = self._judged_slow_at.get(beside)
        if judged_at is not None and self.batches - judged_at >= REJUDGE_AFTER:
            del self._judged_slow_at[beside]
            self._slowdown.pop(beside, None)
        return len(self._slowdown.get(beside, ())) < JUDGED_AFTER

    @property
    def concurrency(self) -> int:
        """How many batches the replica runs at once without slowing down."""
        return self._concurrency

    def _solve_concurrency(self) -> int:
        """One more than the most batches seen beside another whose median slowdown stayed
        small."""
        level = 1
        for beside in range(1, self.max_concurrency):
            ratios = self._slowdown.get(beside)
            if not ratios or len(ratios) < JUDGED_AFTER:
                break
            ratios_sorted = sorted(ratios)
            if ratios_sorted[len(ratios_sorted) // 2] > CONCURRENT_SLOWDOWN:
                break
            level = beside + 1
        return level

    def to_dict(self) -> dict[str, float | int]:
        a, b = self._fit()
        return {"a_ms": round(a * 1000, 3), "b_ms_per_row": round(b * 1000, 4),
                "spread": round(self._spread, 4), "concurrency": self.concurrency,
                "batches": self.batches}
