"""Flush policies: the one place that decides when a queue's rows leave, and for which kind
of replica slot. The scheduler asks; it never decides itself. A new policy is a new class
that implements `FlushPolicy`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from batchproxy.config import BatchingConfig
from batchproxy.engine.queues import KeyQueue


@dataclass(frozen=True, slots=True)
class Flush:
    """Send a batch now. `idle_only`: only a replica with no batch in flight will do."""

    idle_only: bool


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep filling; ask again at `until` (loop time), or when woken."""

    until: float


FLUSH_TO_ANY = Flush(idle_only=False)
FLUSH_TO_IDLE = Flush(idle_only=True)


class FlushPolicy(Protocol):
    name: str

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        """What to do with a non-empty queue now."""
        ...

    def wake_on_submit(self, queue: KeyQueue, rows_before: int) -> bool:
        """Whether rows just added to `queue` (it held `rows_before`) can change a
        decision, so the scheduler must look again before its next due time."""
        ...


class FixedTimeoutPolicy:
    """TFS's rule, as TensorFlow's shared batch scheduler applies it: a full batch leaves at
    once for any replica slot; a partial batch leaves once its oldest call has waited
    `batch_timeout_micros`, and then only for a replica with nothing in flight. While every
    replica is busy the partial batch keeps filling here (a GPU runs one batch at a time, and
    what waits at a replica is frozen at the size it had when sent), so batches grow with
    load. Rows left over after a full batch are due at their own oldest call's time."""

    name = "fixed"

    def __init__(self, config: BatchingConfig) -> None:
        self.full = config.max_batch_size
        self.timeout_s = config.batch_timeout_s

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        if queue.rows >= self.full:
            return FLUSH_TO_ANY
        head = queue.head()
        due = now if head is None else head.enqueued_at + self.timeout_s
        if due <= now:
            return FLUSH_TO_IDLE
        return Hold(due)

    def wake_on_submit(self, queue: KeyQueue, rows_before: int) -> bool:
        # A new head has a due time the scheduler has not seen; a queue that just became
        # full leaves at once. Anything else changes nothing until the due time.
        return rows_before == 0 or rows_before < self.full <= queue.rows


POLICIES: dict[str, type[FixedTimeoutPolicy]] = {FixedTimeoutPolicy.name: FixedTimeoutPolicy}


def make_policy(name: str, config: BatchingConfig) -> FlushPolicy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown batching policy {name!r}; "
                         f"known: {', '.join(sorted(POLICIES))}") from None
