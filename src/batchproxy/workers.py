"""--workers N: N forked processes serving the same ports (SO_REUSEPORT lets the kernel spread
connections), one event loop each.

Workers fork before any gRPC server, channel or event loop exists (gRPC does not survive a
fork once started). Metrics switch to prometheus-client's multiprocess mode first, so that a
scrape answered by any worker covers all of them. The parent only forwards SIGTERM/SIGINT
and waits; it exits non-zero when a worker did (e.g. one whose background task kept
failing), so that whatever runs the proxy restarts it.

The workers share the fleet: the parent creates the slot table of fleet/shared_slots.py
before it forks, so that all of them together keep to --max_inflight_per_replica, and when
it reaps a worker that died it hands that worker's slots back to the others."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable

from batchproxy.fleet import shared_slots

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
    table = shared_slots.SlotTable.create(count)
    shared_slots.install(table)
    children: dict[int, int] = {}  # pid -> worker index
    failed = False
    try:
        for index in range(count):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.environ["BATCHPROXY_WORKER"] = str(index)
                    table.attach(index)
                    serve()
                except BaseException:
                    log.exception("worker %d failed", index)
                    code = 1
                finally:
                    os._exit(code)
            children[pid] = index
        log.info("started %d workers: pids %s", count, ", ".join(map(str, children)))

        def forward(signum: int, frame: object) -> None:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        failed = _wait_all(children, table)
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        failed = _wait_all(children, table) or failed
        shared_slots.install(None)
        table.close()
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


# With SIGCHLD blocked, the parent sleeps in sigtimedwait until a child exits; the timeout
# only bounds how long a missed signal (a replica's exit, which is not ours to reap) could
# delay noticing a worker's.
REAP_POLL_S = 1.0


def _wait_all(children: dict[int, int], table: shared_slots.SlotTable) -> bool:
    """Wait for every worker, handing back the slots of each as it exits; True when any
    exited non-zero."""
    # waitpid on each worker, not wait(): local replicas are this process's children too.
    from prometheus_client import multiprocess

    failed = False
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while children:
            for pid in list(children):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done == 0:
                    continue
                index = children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                failed = failed or code != 0
                multiprocess.mark_process_dead(pid)
                freed = table.reclaim(index)
                if children:
                    log.log(logging.WARNING if code else logging.INFO,
                            "worker %d (pid %d) exited with %d; %d batch slots it held "
                            "are free again", index, pid, code, freed)
            if children:
                signal.sigtimedwait({signal.SIGCHLD}, REAP_POLL_S)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return failed
