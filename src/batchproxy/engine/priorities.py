"""The rules of the two priorities, in one place.

- **Order.** Within a batch key a batch takes critical rows before sheddable ones, each
  class oldest first; sheddable rows fill the room critical ones leave (engine/queues.py).
- **No starvation.** Below capacity critical rows leave room in batches, and sheddable rows
  fill it. Beyond, a sheddable call with a deadline leaves the queue when it passes
  (admission refused it when the wait looked too long); one without a deadline ranks with
  the critical calls by its arrival time once it has waited `MAX_SHEDDABLE_WAIT_S`, so no
  stream of critical calls keeps it waiting forever. (Promoting calls with deadlines too was
  measured: under overload they then take the room critical calls need, and more of those
  miss the SLO.)
- **Shed first.** Admission refuses a sheddable call once the queues hold more than
  `SHEDDABLE_QUEUE_SHARE` of `max_enqueued_rows` or the expected wait passes
  `SHEDDABLE_DEADLINE_SHARE` of its deadline (engine/admission.py; sheddable rows do not
  count in a critical call's expected wait, it goes first), and a critical call
  that finds the queues full evicts queued sheddable calls, newest first, to make room
  (`victims`)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator

from batchproxy.engine.queues import Entry, KeyQueue

# Sheddable calls are refused once this share of the queue bound is taken: the rest is kept
# for critical calls, which then rarely need to evict anything.
SHEDDABLE_QUEUE_SHARE = 0.5
# A sheddable call is refused when the queue's expected wait passes this share of its
# deadline (a critical call: 0.8 of it, engine/admission.py).
SHEDDABLE_DEADLINE_SHARE = 0.5
# A sheddable call without a deadline ranks with critical calls after this long.
MAX_SHEDDABLE_WAIT_S = 1.0


def promote_at(now: float, timeout: float | None) -> float:
    """When a sheddable call arriving `now` stops yielding to newer critical calls: never
    for one with a deadline (it leaves at its deadline)."""
    if timeout is None:
        return now + MAX_SHEDDABLE_WAIT_S
    return math.inf


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
