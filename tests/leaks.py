"""What a test run must not leave behind: child processes still running, and the temporary
folders its helpers create. The suite's tests each clean up on every path (skip and failure
included); conftest.py checks it once the session's fixtures are all torn down."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Prefixes of the folders and files the test helpers create under the temporary directory.
LEFTOVER_PREFIXES = ("batchproxy-prometheus-", "batchproxy-proc-")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of `pid`'s live children (zombies are reaped already or soon)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) != pid or state == "Z":
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        found.append((int(entry.name), command))
    return found


def leftovers(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir()
                  if path.name.startswith(LEFTOVER_PREFIXES))


def leaks(directory: Path, grace_s: float = 5.0) -> list[str]:
    """What is still there after up to `grace_s` (a process on its way out gets the time)."""
    deadline = time.monotonic() + grace_s
    while True:
        procs = children(os.getpid())
        paths = leftovers(directory)
        if (not procs and not paths) or time.monotonic() > deadline:
            return [f"child process {pid}: {command}" for pid, command in procs] + [
                f"temporary path {path}" for path in paths]
        time.sleep(0.1)
