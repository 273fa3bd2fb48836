"""--workers N: one worker warms each replica's model version; the others wait for it.

Every worker runs its own health checks, so without this each one warms every replica that
becomes available, and a replica gets N times the warm-up load (N slow first calls at each
batch size where one would do). The parent creates a directory before it forks (with the
slot table, fleet/shared_slots.py); per (replica address, model, version) it holds:

    <key>.lock   the worker warming it holds a POSIX record lock (fcntl) on this file
    <key>.done   created once a warm-up ended (warmed, or given up on for good)

A worker that finds `.done` takes the version as warmed. One that gets the lock warms it and
creates `.done`; one that does not waits for `.done` or for the lock: the kernel drops a
lock when its holder dies, so a worker killed mid-warm-up leaves the lock to the next, which
finds no `.done` and warms it itself. A holder alive but stuck is waited for only so long
(the caller's bound), then the waiter warms on its own. A replica that is ejected or
drained may come back as a new process: its `.done` files are removed (by each worker that
sees it go; a second removal only costs a second warm-up, never a skipped one)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

# (replica address, model, version or None)
Key = tuple[str, str, int | None]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class WarmupClaims:
    """This worker's handle on the shared directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._locks: dict[Key, int] = {}  # keys this worker holds the lock of: its fd

    def _path(self, key: Key, suffix: str) -> Path:
        address, model, version = key
        return self.directory / f"{_digest(address)}-{_digest(f'{model}|{version}')}{suffix}"

    def done(self, key: Key) -> bool:
        return self._path(key, ".done").exists()

    def try_lock(self, key: Key) -> bool:
        """Take the key's lock if no other worker holds it (never blocks)."""
        if key in self._locks:
            return True
        fd = os.open(self._path(key, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[key] = fd
        return True

    def unlock(self, key: Key) -> None:
        fd = self._locks.pop(key, None)
        if fd is not None:
            # Closing the file drops this process's lock on it.
            os.close(fd)

    def mark_done(self, key: Key) -> None:
        self._path(key, ".done").touch()

    def forget(self, address: str) -> None:
        """The replica at `address` went away: what was warmed there is not any more."""
        for path in self.directory.glob(f"{_digest(address)}-*.done"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        for key in list(self._locks):
            self.unlock(key)
