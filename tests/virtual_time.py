"""`@virtual`: run an async test on the simulator's virtual-time loop instead of a real one,
so its sleeps take no time and its timings are exact (the way engine tests run)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from batchproxy.sim.clock import run_virtual


def virtual(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        run_virtual(test(*args, **kwargs))
    return run
