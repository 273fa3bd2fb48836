"""Runs a LoadSpec in this process, or in several generator processes at once (each its own
event loop and connections) whose results merge exactly.

Generator processes are fresh interpreters (subprocess, not fork: a parent that already
used gRPC cannot fork safely; not multiprocessing's spawn: it re-imports the parent's
__main__, which for `python -m batchproxy` runs the command line again). They talk to the
parent over two pipes with multiprocessing's framed pickles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Coroutine, Iterable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

import batchproxy
from batchproxy.bench.cpu import CpuWindow
from batchproxy.bench.driver import ProgressFn, Tick, run_worker
from batchproxy.bench.results import RunResult, WorkerResult
from batchproxy.bench.spec import LoadSpec

T = TypeVar("T")
START_MARGIN_S = 0.2  # between the last process being ready and the shared start
READY_TIMEOUT_S = 60.0


def run_coroutine(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def run_load_async(spec: LoadSpec, progress: ProgressFn | None = None,
                         watch_pids: Iterable[int] = ()) -> RunResult:
    """One generator on the running event loop."""
    window = CpuWindow(watch_pids)

    def hook(event: str) -> None:
        window.start() if event == "start" else window.stop()

    part = await run_worker(spec, progress, hook)
    result = RunResult.merge(spec, [part])
    result.watched_cpu_s = window.seconds
    return result


def run_load(spec: LoadSpec, processes: int = 1, progress: ProgressFn | None = None,
             watch_pids: Iterable[int] = ()) -> RunResult:
    """Run `spec` shared among `processes` generator processes (1: in this process, on a
    new event loop) and merge their results; `watch_pids` are process trees whose CPU in the
    measured window is reported (RunResult.watched_cpu_s)."""
    if processes <= 1:
        return run_coroutine(run_load_async(spec, progress, watch_pids), spec.use_uvloop)
    return _Parallel(spec, processes, progress, watch_pids).run()


class _Child:
    def __init__(self, spec: LoadSpec) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        src = str(Path(batchproxy.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        code = ("import sys; from batchproxy.bench.runner import child_main; "
                "child_main(int(sys.argv[1]), int(sys.argv[2]))")
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.recv = Connection(from_child_r, writable=False)
        self.send.send(spec)

    def stop(self) -> None:
        for conn in (self.send, self.recv):
            conn.close()
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class _Parallel:
    def __init__(self, spec: LoadSpec, processes: int, progress: ProgressFn | None,
                 watch_pids: Iterable[int]) -> None:
        self.spec = spec
        self.shares = spec.split(processes)
        self.progress = progress
        self.window = CpuWindow(watch_pids)
        self.ticks: dict[int, list[Tick]] = {}

    def run(self) -> RunResult:
        children = [_Child(share) for share in self.shares]
        try:
            problems = self._gather(children, "ready", time.monotonic() + READY_TIMEOUT_S)
            start_at = time.monotonic() + START_MARGIN_S
            for child in children:
                child.send.send(start_at)
            parts = self._gather(children, "result", None, start_at)
        finally:
            for child in children:
                child.stop()
        result = RunResult.merge(self.spec, parts)
        result.connect_problems = [p for ps in problems for p in ps]
        result.watched_cpu_s = self.window.seconds
        return result

    def _gather(self, children: list[_Child], kind: str, deadline: float | None,
                start_at: float | None = None) -> list[Any]:
        """Wait for one `kind` message from every child, handling progress on the way."""
        answers: dict[int, Any] = {}
        index = {child.recv: i for i, child in enumerate(children)}
        measure_from = end_at = None
        if start_at is not None:
            measure_from = start_at + self.spec.warmup_s
            end_at = measure_from + (self.spec.duration_s or float("inf"))
        while len(answers) < len(children):
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(f"generator processes not {kind} after {READY_TIMEOUT_S}s")
            if measure_from is not None and end_at is not None:
                if measure_from <= now < end_at:
                    self.window.start()
                elif now >= end_at:
                    self.window.stop()
            pending = [child.recv for i, child in enumerate(children) if i not in answers]
            for conn in wait(pending, timeout=0.02):
                i = index[conn]  # type: ignore[index]
                try:
                    message, payload = conn.recv()  # type: ignore[union-attr,call-arg]
                except EOFError:
                    code = children[i].popen.wait()
                    raise RuntimeError(f"generator process {i} exited ({code})") from None
                if message == "error":
                    raise RuntimeError(f"generator process {i} failed:\n{payload}")
                if message == "tick":
                    self._tick(cast(Tick, payload))
                elif message == kind:
                    answers[i] = payload
        if kind == "result":
            self.window.stop()
        return [answers[i] for i in range(len(children))]

    def _tick(self, tick: Tick) -> None:
        ticks = self.ticks.setdefault(tick.second, [])
        ticks.append(tick)
        if len(ticks) == len(self.shares) and self.progress is not None:
            del self.ticks[tick.second]
            self.progress(Tick(
                tick.second, sum(t.ok for t in ticks), sum(t.failed for t in ticks),
                sum(t.in_flight for t in ticks), tick.warmup,
                np.concatenate([np.asarray(t.latencies) for t in ticks]).tolist()))


def child_main(read_fd: int, write_fd: int) -> None:
    """A generator process: receive the spec, connect, say ready, wait for the shared start
    time, run, send the result."""
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    try:
        spec: LoadSpec = recv.recv()

        def progress(tick: Tick) -> None:
            # float32 halves what crosses the pipe; a progress line needs no more.
            tick.latencies = np.asarray(tick.latencies, np.float32)  # type: ignore[assignment]
            send.send(("tick", tick))

        def ready(problems: list[str]) -> float:
            send.send(("ready", problems))
            return recv.recv()

        result: WorkerResult = run_coroutine(run_worker(spec, progress, None, ready),
                                             spec.use_uvloop)
        send.send(("result", result))
    except (EOFError, BrokenPipeError):
        pass  # the parent gave up
    except BaseException:
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()
        recv.close()

