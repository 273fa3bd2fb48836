"""CPU time of process trees, from /proc (Linux), to put a server's CPU cost per request
next to its throughput. A tree, because `batchproxy serve --workers N` forks its workers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or no /proc
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return text.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, all its threads (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state ppid ... utime (field 14) stime (15), counted from field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for root in roots for pid in process_tree(root))


class CpuWindow:
    """CPU spent by the trees of `roots` between start() and stop()."""

    def __init__(self, roots: Iterable[int]) -> None:
        self.roots = tuple(roots)
        self._start: float | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        if self.roots and self._start is None:
            self._start = tree_cpu_seconds(self.roots)

    def stop(self) -> None:
        if self._start is not None and self.seconds is None:
            self.seconds = tree_cpu_seconds(self.roots) - self._start
