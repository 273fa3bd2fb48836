"""An asyncio event loop on a virtual clock.

The loop is asyncio's own selector loop; only its clock and its selector are replaced. The
clock starts at 0 and moves only when the loop would otherwise wait: the selector never
sleeps, it jumps the clock to the next timer instead. So timers, `asyncio.sleep`,
`loop.call_at` and every `loop.time()` reading in the code under test see a consistent
virtual time, a minute of it passes in however long the callbacks take to run, and the same
inputs give the same schedule every time.

Nothing here reads a wall clock. A loop with no ready callback and no timer can never wake
up again (there is no I/O in a simulation): that is a deadlock and raises `DeadlockError`
rather than hanging."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlockError(RuntimeError):
    """Every task waits and no timer is due: nothing can ever run again."""


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class VirtualSelector(selectors.BaseSelector):
    """Keeps registrations (the loop registers its self-pipe) but never polls them: a
    simulation has no I/O. `select(timeout)` hands the wait to the loop's clock."""

    def __init__(self, loop: VirtualEventLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        if key.fd in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        self._keys[key.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(_fd(fileobj))

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._loop._advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return {key.fileobj: key for key in self._keys.values()}

    def close(self) -> None:
        self._keys.clear()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop whose `time()` is virtual seconds since the loop was made."""

    def __init__(self) -> None:
        self._now = 0.0  # before the base class, which may read the clock
        super().__init__(VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def _advance(self, timeout: float | None) -> None:
        """Called where the loop would block for `timeout` seconds (None: forever)."""
        if timeout is None:
            raise DeadlockError(
                f"deadlock at virtual time {self._now:.6f}s: no callback is ready and no "
                "timer is scheduled, so no task can ever wake up")
        if timeout <= 0:
            return
        # asyncio computed `timeout` from its earliest timer; jump to that timer's own
        # deadline instead of adding the difference back, so virtual times stay exact
        # (now + (when - now) need not equal `when` in floating point).
        scheduled = getattr(self, "_scheduled", None)
        target = scheduled[0].when() if scheduled else self._now + timeout
        self._now = max(self._now, target)


def run_virtual(main: Coroutine[Any, Any, T], *, debug: bool = False) -> T:
    """Run `main` to completion on a fresh virtual-time loop and close the loop, the way
    `asyncio.run` does with a real one."""
    with asyncio.Runner(debug=debug, loop_factory=VirtualEventLoop) as runner:
        return runner.run(main)
