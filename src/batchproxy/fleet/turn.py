"""How late the proxy's own loop turns back to a replica that just answered.

A replica that answers a batch sits idle until the proxy sends it the next one. Between the
two, the proxy's single event loop has its own work to do first: it hands the batch's
answers to their callers (each a task that writes a response), reads the calls those callers
send next, and only then runs the scheduler's pass and the task that sends the next batch.
With 64 answers to write that turn took 8 ms on a 50 ms batch: the replica idled 14 % of the
time while a full batch waited in the proxy.

`TurnLag` measures that turn as two parts, each independent of what the policy does with it:
from a replica's answer to the scheduler's next pass (`answered`, `looked`), and from a pass
to the start of the send task it spawned (`looked`, `sending`). The adaptive policy sends a
full batch a margin over that before its replica is expected to free (engine/policy.py,
lead_s), so that it waits there instead of the replica waiting for it. On the simulator's
virtual clock the loop costs no time, both parts are zero, and so is the lead."""

from __future__ import annotations

# The estimate follows a longer turn within a few samples and a shorter one over tens:
# what it guards against, a replica idle for a turn, costs more than a lead a little long.
RISE = 0.25
FALL = 0.05


class TurnLag:
    def __init__(self) -> None:
        self._to_pass = 0.0  # answer -> scheduler pass, decaying estimate (seconds)
        self._to_send = 0.0  # scheduler pass -> send task running
        self._answered_at: float | None = None  # the oldest answer no pass has seen yet
        self._looked_at: float | None = None  # the last pass

    @property
    def seconds(self) -> float:
        """How long after a replica's answer the proxy's next batch for it leaves."""
        return self._to_pass + self._to_send

    def answered(self, now: float) -> None:
        """A replica answered a batch now: a slot is free, and the scheduler was woken."""
        if self._answered_at is None:
            self._answered_at = now

    def looked(self, now: float) -> None:
        """The scheduler's pass runs now."""
        self._looked_at = now
        if self._answered_at is not None:
            self._to_pass = follow(self._to_pass, now - self._answered_at)
            self._answered_at = None

    def sending(self, now: float) -> None:
        """A batch a pass handed over leaves now, from its own task."""
        if self._looked_at is not None:
            self._to_send = follow(self._to_send, max(now - self._looked_at, 0.0))


def follow(estimate: float, sample: float) -> float:
    return estimate + (RISE if sample > estimate else FALL) * (sample - estimate)
