"""One generator process's event loop: closed-loop callers or Poisson arrivals, timed
against time.monotonic() (one clock for all processes on Linux, so they share a window).

The measured window opens when the warm-up ends and closes at the duration's end (calls
still in flight are then cancelled: the run never outlives its bound) or, with a request
count, when the last of those calls is answered. A call counts when it completes inside the
window, whenever it was sent, so a target slower than the warm-up still gets its true
throughput. Latency runs from the moment a call is handed to the transport to its answer; in
the open loop, how late each call left after its scheduled arrival is kept too (the send
lag), so a generator that falls behind shows it."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batchproxy.bench.client import Client, make_client
from batchproxy.bench.results import WorkerResult
from batchproxy.bench.spec import LoadSpec

CONNECT_TIMEOUT_S = 5.0


@dataclass
class Tick:
    """One second of progress (warm-up included), for the line printed each second."""

    second: int
    ok: int
    failed: int
    in_flight: int
    warmup: bool
    latencies: list[float] = field(default_factory=list)


ProgressFn = Callable[[Tick], None]
WindowHook = Callable[[str], None]  # "start" at the end of the warm-up, "end" at the window's


class Driver:
    def __init__(self, spec: LoadSpec, client: Client, start_at: float,
                 progress: ProgressFn | None = None,
                 window_hook: WindowHook | None = None) -> None:
        self.spec = spec
        self.client = client
        self.start_at = start_at
        self.measure_from = start_at + spec.warmup_s
        self.end_at = (self.measure_from + spec.duration_s if spec.duration_s is not None
                       else math.inf)
        self.budget = spec.requests if spec.requests is not None else -1  # -1: no count bound
        self.progress = progress
        self.window_hook = window_hook
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sent = self.ok = self.in_window = self.dropped = 0
        self.in_flight = 0
        self.last_done = self.measure_from
        self.window_end = self.measure_from
        self.cpu_s = 0.0
        # Progress counts every completion, warm-up included.
        self._tick_ok = self._tick_failed = 0
        self._tick_latencies: list[float] = []

    def _take(self, now: float) -> bool:
        """May a call leave now? Counts it against --requests once the warm-up is over."""
        if now >= self.end_at or self.budget == 0:
            return False
        if now >= self.measure_from:
            if self.budget > 0:
                self.budget -= 1
            self.sent += 1
        return True

    def _done(self, sent_at: float, code: str | None) -> None:
        now = time.monotonic()
        if code is None:
            self._tick_ok += 1
            self._tick_latencies.append(now - sent_at)
        else:
            self._tick_failed += 1
        if not self.measure_from <= now <= self.end_at:
            return
        if code is None:
            self.ok += 1
            self.latencies.append(now - sent_at)
        else:
            self.errors[code] += 1
        self.in_window += 1
        self.last_done = now

    async def _caller(self) -> None:
        call, clock = self.client.call, time.monotonic
        while True:
            sent_at = clock()
            if not self._take(sent_at):
                return
            self.in_flight += 1
            try:
                code = await call()
            finally:
                self.in_flight -= 1
            self._done(sent_at, code)

    async def _one(self, scheduled: float) -> None:
        sent_at = time.monotonic()
        if scheduled >= self.measure_from:
            self.lags.append(sent_at - scheduled)
        self.in_flight += 1
        try:
            code = await self.client.call()
        finally:
            self.in_flight -= 1
        self._done(sent_at, code)

    async def _arrivals(self) -> None:
        """Poisson arrivals: exponential gaps. Timers are coarse (about 1 ms), so each wake-up
        sends every arrival whose time has come; the lag records how late each one left."""
        loop = asyncio.get_running_loop()
        rng = random.Random(self.spec.seed)
        rate = self.spec.rate
        tasks: set[asyncio.Task[None]] = set()
        scheduled = self.start_at + rng.expovariate(rate)
        try:
            while True:
                now = time.monotonic()
                while scheduled <= now:
                    if not self._take(scheduled):
                        if tasks:
                            await asyncio.wait(tasks)
                        return
                    if self.in_flight >= self.spec.max_outstanding:
                        self.dropped += scheduled >= self.measure_from
                    else:
                        task = loop.create_task(self._one(scheduled))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    scheduled += rng.expovariate(rate)
                await asyncio.sleep(scheduled - now)
        finally:
            for task in tasks:
                task.cancel()

    async def _ticker(self) -> None:
        second = 0
        while True:
            second += 1
            await _sleep_until(self.start_at + second)
            tick = Tick(second, self._tick_ok, self._tick_failed, self.in_flight,
                        self.start_at + second <= self.measure_from, self._tick_latencies)
            self._tick_ok = self._tick_failed = 0
            self._tick_latencies = []
            if self.progress is not None:
                self.progress(tick)

    async def _send(self) -> None:
        if self.spec.concurrency:
            await asyncio.gather(*(self._caller() for _ in range(self.spec.concurrency)))
        else:
            await self._arrivals()

    async def run(self) -> WorkerResult:
        await _sleep_until(self.start_at)
        ticker = asyncio.ensure_future(self._ticker())
        sending = asyncio.ensure_future(self._send())
        try:
            await asyncio.wait([sending], timeout=max(self.measure_from - time.monotonic(), 0))
            if self.window_hook is not None:
                self.window_hook("start")
            cpu_start = time.process_time()
            remaining = (None if self.end_at == math.inf
                         else max(self.end_at - time.monotonic(), 0))
            await asyncio.wait([sending], timeout=remaining)
            if sending.done():  # the request count was reached: the last answer ends it
                sending.result()
                self.window_end = min(self.end_at, self.last_done)
            else:  # the duration is over: calls still in flight would only be discarded
                self.window_end = self.end_at
            self.cpu_s = time.process_time() - cpu_start
            if self.window_hook is not None:
                self.window_hook("end")
        finally:
            for task in (sending, ticker):
                task.cancel()
            await asyncio.gather(sending, ticker, return_exceptions=True)
        return WorkerResult(
            latencies=np.asarray(self.latencies, dtype=np.float64),
            lags=np.asarray(self.lags, dtype=np.float64),
            errors=dict(self.errors), sent=self.sent, ok=self.ok, in_window=self.in_window,
            dropped=self.dropped, window_start=self.measure_from, window_end=self.window_end,
            cpu_s=self.cpu_s)


async def _sleep_until(when: float) -> None:
    # Event-loop timers may fire up to a millisecond early (uvloop rounds): sleep again.
    while (delay := when - time.monotonic()) > 0:
        await asyncio.sleep(delay)


async def run_worker(spec: LoadSpec, progress: ProgressFn | None = None,
                     window_hook: WindowHook | None = None,
                     ready: Callable[[list[str]], float] | None = None,
                     start_delay_s: float = 0.05) -> WorkerResult:
    """Connect, then run `spec` on this event loop. `ready(problems)`, if given, is told the
    connections are open and returns the shared start time (several processes); else the
    run starts start_delay_s from now."""
    client = make_client(spec)
    try:
        problems = await client.connect(CONNECT_TIMEOUT_S)
        if ready is not None:
            start_at = await asyncio.get_running_loop().run_in_executor(None, ready, problems)
        else:
            start_at = time.monotonic() + start_delay_s
        result = await Driver(spec, client, start_at, progress, window_hook).run()
        result.connect_problems = problems
        result.first_error = client.first_error
        return result
    finally:
        await client.close()
