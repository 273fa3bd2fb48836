"""Timing for the in-process micro-benchmarks: the CPU time this thread spent per call, so
that another process's turn on a shared core does not count against the code measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6
