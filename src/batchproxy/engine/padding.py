"""Allowed batch sizes (TFS's `allowed_batch_sizes`): how many rows the next batch takes and
how many padding rows it carries.

A compiled model runs only at a few sizes. TFS pads a batch of n rows up to the next
allowed size (`pad_up`). TensorFlow's batch op also knows `batch_down`: send the largest
allowed size that fits and keep the rest queued, so no replica time is spent on padding.
`min_cost` picks whichever of the two costs less per real row by the replica's learned
cost (`a + b * rows`, fleet/costs.py): padding 9 rows to 16 is cheap when the fixed part
dominates, dear when the per-row part does. Until the fit has seen batches of different
sizes it alternates the two, so that it learns the slope at all. The codec writes the
padding rows (copies of a real row) and the dispatcher cuts them from the answer before it
is split."""

from __future__ import annotations

import bisect

from batchproxy.config import BatchingConfig
from batchproxy.fleet.costs import CostModel


def pad_up_size(sizes: tuple[int, ...], rows: int) -> int:
    """The smallest allowed size that holds `rows` (rows itself when none is set)."""
    if not sizes:
        return rows
    at = bisect.bisect_left(sizes, rows)
    return sizes[at] if at < len(sizes) else rows


def batch_down_size(sizes: tuple[int, ...], rows: int) -> int | None:
    """The largest allowed size of no more than `rows` rows; None below the smallest."""
    at = bisect.bisect_right(sizes, rows)
    return sizes[at - 1] if at else None


def padding_for(sizes: tuple[int, ...], rows: int) -> int:
    """Padding rows a batch of `rows` real rows carries."""
    return pad_up_size(sizes, rows) - rows if rows else 0


class Padding:
    """Decides the room of the next batch of a queue under the padding policy."""

    def __init__(self, config: BatchingConfig) -> None:
        self.sizes = config.allowed_batch_sizes
        self.policy = config.padding_policy
        self.full = config.max_batch_size
        self._explore = False

    def room(self, queued: int, cost: CostModel | None) -> int:
        """Rows the next batch may take out of `queued` waiting (max_batch_size, unless
        batching down to an allowed size keeps the rest queued)."""
        sizes = self.sizes
        if not sizes or self.policy == "pad_up" or queued >= self.full:
            return self.full
        down = batch_down_size(sizes, queued)
        if down is None or down == queued:
            return self.full  # below the smallest size, padding is the only way; or exact
        if self.policy == "batch_down" or cost is None:
            return down if self.policy == "batch_down" else self.full
        if not cost.slope_known:
            # Padded batches tend to be all of one size, and one size cannot tell the
            # per-row cost from the fixed one: the prior's slope would make padding look
            # free forever. Alternate the two choices until the fit knows the slope.
            self._explore = not self._explore
            return down if self._explore else self.full
        return down if self.cheaper_down(queued, down, cost) else self.full

    def cheaper_down(self, queued: int, down: int, cost: CostModel) -> bool:
        """Whether `down` rows now cost less per real row than `queued` padded up."""
        up = pad_up_size(self.sizes, queued)
        return cost.predict(down) / down < cost.predict(up) / queued
