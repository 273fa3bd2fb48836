"""A schedule to judge policies by where arrivals come in bursts: the best any policy of the
engine's kind reaches, computed from the arrivals alone, with no engine and no clock.

`fifo_full_batches` knows the future. Rows go out oldest first, a batch holds `full` rows
(the last of a burst leaves with that burst's last row, since nothing more will come to fill
it), and each batch starts the moment both its last row has arrived and a server is free.
For identical servers and batches that all cost the same, starting each batch as early as
that is the earliest any schedule can start it, so every batch's start is the least it can
be. What is left to a real policy is only to match it: a partial batch sent to a free server
mid-burst takes a whole batch's fixed cost for a few rows, and later batches start later.

It is a floor where the load keeps a backlog, so that every batch a good policy sends is
full: for policies that keep calls in arrival order, send full batches from a backlog and
never leave a server idle while a full batch waits. At light load it is not: a partial batch
on an idle server then costs nothing, and a policy that sends one beats the schedule. A
policy that reorders calls (shortest first, say) could reach a lower p99 only by making some
calls wait much longer."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from batchproxy.sim.workloads import Arrival, Shape


def fifo_full_batches(arrivals: Sequence[Arrival], shapes: Sequence[Shape], servers: int,
                      batch_s: Callable[[int], float], full: int,
                      cycle_s: float | None = None) -> list[float]:
    """Seconds from arrival to answer of each call (in the order of `arrivals`, which must be
    by time) under the schedule above. `servers`: batches run at once, each alone costing
    `batch_s(rows)`; `cycle_s`: the bursts' period (on + off), or None for one long stream.
    A call whose rows span two batches is answered with the later one."""
    if servers < 1 or full < 1:
        raise ValueError("servers and full must be at least 1")
    # One entry per row: (arrival time, call index), oldest first.
    rows = [(arrival.time_s, index) for index, arrival in enumerate(arrivals)
            for _ in range(shapes[arrival.shape].rows)]
    free = [0.0] * servers  # when each server can start its next batch (a heap)
    answered = [0.0] * len(arrivals)
    first = 0
    while first < len(rows):
        burst = _burst(rows[first][0], cycle_s)
        last = first
        while last < min(first + full, len(rows)) and _burst(rows[last][0], cycle_s) == burst:
            last += 1
        start = max(heapq.heappop(free), rows[last - 1][0])
        end = start + batch_s(last - first)
        heapq.heappush(free, end)
        for _, index in rows[first:last]:
            answered[index] = end  # rows go in order, so the call's last batch ends latest
        first = last
    return [answered[index] - arrival.time_s for index, arrival in enumerate(arrivals)]


def _burst(time_s: float, cycle_s: float | None) -> int:
    return 0 if cycle_s is None else math.floor(time_s / cycle_s)
