"""The rules of the two priorities, in one place.

- **Order.** Within a batch key a batch takes critical rows before sheddable ones, each
  class oldest first; sheddable rows fill the room critical ones leave (engine/queues.py).
- **No starvation.** A sheddable call that has waited half its deadline (or
  `MAX_SHEDDABLE_WAIT_S` without one) ranks with the critical calls by its arrival time, so
  at moderate load a stream of critical calls never keeps it out of every batch.
- **Shed first.** Admission refuses a sheddable call once the queues hold more than
  `SHEDDABLE_QUEUE_SHARE` of `max_enqueued_rows` (engine/admission.py), and a critical call
  that finds the queues full evicts queued sheddable calls, newest first, to make room
  (`victims`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from batchproxy.engine.queues import Entry, KeyQueue

# Sheddable calls are refused once this share of the queue bound is taken: the rest is kept
# for critical calls, which then rarely need to evict anything.
SHEDDABLE_QUEUE_SHARE = 0.5
# A sheddable call ranks with critical calls after this share of its deadline...
PROMOTE_AFTER_SHARE = 0.5
# ...or, without a deadline, after this long.
MAX_SHEDDABLE_WAIT_S = 1.0


def promote_at(now: float, timeout: float | None) -> float:
    """When a sheddable call arriving `now` stops yielding to newer critical calls."""
    if timeout is None:
        return now + MAX_SHEDDABLE_WAIT_S
    return now + min(PROMOTE_AFTER_SHARE * timeout, MAX_SHEDDABLE_WAIT_S)


def _evictable(queues: Iterable[KeyQueue]) -> Iterator[Entry]:
    """Queued sheddable calls none of whose rows left yet, newest first across all keys.
    A call already cut into a batch is left alone: its rows are at a replica."""
    newest_first = (reversed(queue.sheddable) for queue in queues)
    for entry in heapq.merge(*newest_first, key=lambda entry: -entry.enqueued_at):
        if not entry.dead and entry.next_row == 0:
            yield entry


def victims(queues: Iterable[KeyQueue], rows_over: int, bytes_over: int) -> list[Entry]:
    """The sheddable calls to evict so that `rows_over` rows and `bytes_over` bytes fit,
    newest first; empty when evicting every one of them would still not make room (the
    critical call is then refused, and no sheddable call is failed for nothing)."""
    chosen: list[Entry] = []
    for entry in _evictable(queues):
        if rows_over <= 0 and bytes_over <= 0:
            break
        chosen.append(entry)
        rows_over -= entry.rows
        bytes_over -= entry.nbytes
    if rows_over > 0 or bytes_over > 0:
        return []
    return chosen
