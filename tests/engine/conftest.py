"""Engine tests run on the simulator's virtual clock: `vrun(coro)` runs a coroutine to the
end on a fresh virtual-time loop. No test here sleeps for real."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from batchproxy.sim.clock import run_virtual


@pytest.fixture
def vrun() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return run_virtual
