"""Faults on a schedule, and the questions a simulated replica asks of them.

A fault is written `KIND:REPLICA:START-END[:VALUE]`, times in virtual seconds, REPLICA an
index or `*` for every replica:

    crash:0:10-20        replica 0 refuses every call (UNAVAILABLE) from 10 s to 20 s,
                         and calls it is working on when the crash starts fail then
    hang:1:15-18         replica 1 answers nothing from 15 s to 18 s: calls wait for the
                         end of the hang or their deadline, whichever comes first
    slow:2:5-30:4        work replica 2 starts between 5 s and 30 s takes 4x as long
    errors:*:0-60:0.05   every replica fails 5 % of its Predict calls with UNAVAILABLE
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("crash", "hang", "slow", "errors")


@dataclass(frozen=True)
class Fault:
    kind: str
    replica: int | None  # None: every replica
    start_s: float
    end_s: float
    value: float = 0.0  # slow: the factor; errors: the probability

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")
        if not 0 <= self.start_s <= self.end_s:
            raise ValueError(f"fault interval {self.start_s}-{self.end_s} is not 0 <= start "
                             "<= end")
        if self.kind == "slow" and self.value <= 0:
            raise ValueError("a slow fault needs a factor > 0")
        if self.kind == "errors" and not 0 <= self.value <= 1:
            raise ValueError("an errors fault needs a probability in [0, 1]")

    def applies_to(self, replica: int) -> bool:
        return self.replica is None or self.replica == replica

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


def parse_fault(spec: str) -> Fault:
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"fault {spec!r}: expected KIND:REPLICA:START-END[:VALUE]")
    kind, replica, interval = parts[:3]
    try:
        start, end = (float(x) for x in interval.split("-"))
        value = float(parts[3]) if len(parts) == 4 else 0.0
        index = None if replica in ("*", "all") else int(replica)
    except ValueError:
        raise ValueError(f"fault {spec!r}: expected KIND:REPLICA:START-END[:VALUE] with "
                         "numbers") from None
    if kind in ("slow", "errors") and len(parts) != 4:
        raise ValueError(f"fault {spec!r}: {kind} needs a value")
    return Fault(kind, index, start, end, value)


class FaultSchedule:
    """The faults of one replica, asked at the moments the replica acts."""

    def __init__(self, faults: list[Fault]) -> None:
        self.crashes = [f for f in faults if f.kind == "crash"]
        self.hangs = [f for f in faults if f.kind == "hang"]
        self.slows = [f for f in faults if f.kind == "slow"]
        self.errors = [f for f in faults if f.kind == "errors"]

    @classmethod
    def for_replica(cls, faults: list[Fault], replica: int) -> FaultSchedule:
        return cls([f for f in faults if f.applies_to(replica)])

    def crashed(self, t: float) -> bool:
        return any(f.active(t) for f in self.crashes)

    def crash_during(self, start: float, end: float) -> float | None:
        """The first crash that begins while work runs from `start` to `end`."""
        begins = [f.start_s for f in self.crashes if start < f.start_s < end]
        return min(begins) if begins else None

    def hang_end(self, t: float) -> float | None:
        """When a hang covering `t` ends (chained hangs count as one), else None."""
        end = None
        moved = True
        while moved:
            moved = False
            for f in self.hangs:
                if f.active(t if end is None else end):
                    end = f.end_s
                    moved = True
        return end

    def slow_factor(self, t: float) -> float:
        factor = 1.0
        for f in self.slows:
            if f.active(t):
                factor *= f.value
        return factor

    def error_rate(self, t: float) -> float:
        """Chance a call fails: independent error faults combine."""
        ok = 1.0
        for f in self.errors:
            if f.active(t):
                ok *= 1.0 - f.value
        return 1.0 - ok
