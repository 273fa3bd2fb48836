"""--workers N: N forked processes serving the same ports (SO_REUSEPORT lets the kernel spread
connections), one event loop each.

Workers fork before any gRPC server, channel or event loop exists (gRPC does not survive a
fork once started). Metrics switch to prometheus-client's multiprocess mode first, so that a
scrape answered by any worker covers all of them. The parent only forwards SIGTERM/SIGINT
and waits; it exits non-zero when a worker did (e.g. one whose background task kept
failing), so that whatever runs the proxy restarts it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable

log = logging.getLogger(__name__)


def enable_multiprocess_metrics() -> str:
    """Point prometheus-client at a fresh shared directory; returns it."""
    directory = tempfile.mkdtemp(prefix="batchproxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    # The value class is chosen when prometheus_client is imported; choose again now.
    values.ValueClass = values.get_value_class()
    return directory


def run_workers(count: int, serve: Callable[[], None]) -> int:
    """Fork `count` workers running `serve`; returns 0 when all exited cleanly, else 1."""
    directory = enable_multiprocess_metrics()
    children: list[int] = []
    failed = False
    try:
        for index in range(count):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.environ["BATCHPROXY_WORKER"] = str(index)
                    serve()
                except BaseException:
                    log.exception("worker %d failed", index)
                    code = 1
                finally:
                    os._exit(code)
            children.append(pid)
        log.info("started %d workers: pids %s", count, ", ".join(map(str, children)))

        def forward(signum: int, frame: object) -> None:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        failed = _wait_all(children)
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        failed = _wait_all(children) or failed
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


def _wait_all(children: list[int]) -> bool:
    """Wait for every worker; True when any exited non-zero."""
    # waitpid on each worker, not wait(): local replicas are this process's children too.
    from prometheus_client import multiprocess

    failed = False
    while children:
        pid = children[0]
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(pid, 0)
            failed = failed or os.waitstatus_to_exitcode(status) != 0
        children.remove(pid)
        multiprocess.mark_process_dead(pid)
    return failed
