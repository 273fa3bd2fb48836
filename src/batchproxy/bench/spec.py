"""What one load run is: target, body, loop kind and bounds (LoadSpec), and how a run is
shared between generator processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_DURATION_S = 10.0


@dataclass(frozen=True)
class LoadSpec:
    """One run. Closed loop when `concurrency` > 0 (that many callers, each sending its next
    call when the last one is answered), open loop when `rate` > 0 (Poisson arrivals at
    `rate` calls per second, whatever the answers do). Bounded by `duration_s`, `requests`
    or both, counted after `warmup_s`."""

    targets: tuple[str, ...]
    protocol: str  # "grpc" or "rest"
    path: str  # gRPC method path, or the REST URL's path
    body: bytes
    rows: int = 1
    concurrency: int = 0
    rate: float = 0.0
    duration_s: float | None = DEFAULT_DURATION_S
    requests: int | None = None
    warmup_s: float = 0.0
    timeout_s: float = 10.0
    connections: int = 1  # gRPC channels per target and process (each its own TCP connection)
    max_outstanding: int = 10_000  # open loop: arrivals beyond this many in flight are dropped
    seed: int = 0
    use_uvloop: bool = True
    model: str = ""  # for titles and reports: the body names the model the calls go to

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be grpc or rest, not {self.protocol!r}")
        if not self.targets:
            raise ValueError("at least one target")
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.duration_s is None and self.requests is None:
            raise ValueError("a run needs a bound: duration_s, requests or both")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration_s must be positive")
        if self.requests is not None and self.requests <= 0:
            raise ValueError("requests must be positive")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency > 0 else "open"

    @property
    def offered(self) -> str:
        return f"c={self.concurrency}" if self.concurrency else f"{self.rate:g}/s"

    def split(self, processes: int) -> list[LoadSpec]:
        """The share of each of `processes` generator processes: callers, rate and request
        count divided as evenly as they go (a process may get no callers and is left out)."""
        shares: list[LoadSpec] = []
        for index in range(processes):
            concurrency = _share(self.concurrency, processes, index)
            requests = None if self.requests is None else _share(self.requests, processes, index)
            if (self.concurrency and not concurrency) or requests == 0:
                continue
            shares.append(dataclasses.replace(
                self, concurrency=concurrency, rate=self.rate / processes,
                requests=requests, seed=self.seed * 1000 + index))
        return shares


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)
