"""The workers' warm-up claims: one process holds a key's lock at a time, a holder that
dies leaves it to the next (the kernel drops its lock), `.done` says a warm-up ended, and a
replica that went away is warmed again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from batchproxy.fleet.warmup_claims import WarmupClaims

KEY = ("127.0.0.1:8500", "m", 2)

HOLD = """
import sys, time
from batchproxy.fleet.warmup_claims import WarmupClaims
claims = WarmupClaims(sys.argv[1])
assert claims.try_lock(("127.0.0.1:8500", "m", 2))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_key_is_held_by_one_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        claims = WarmupClaims(tmp_path)
        assert not claims.try_lock(KEY)  # another worker is warming it
        assert claims.try_lock(("127.0.0.1:8500", "m", 3))  # another version is free
        holder.kill()  # dies mid-warm-up, without a word
        holder.wait(30)
        assert claims.try_lock(KEY)
        assert not claims.done(KEY)  # nothing says it was warmed: this one warms it
        claims.close()
    finally:
        holder.kill()
        holder.wait(30)


def test_done_is_seen_by_all_and_forgotten_with_the_replica(tmp_path: Path) -> None:
    one, other = WarmupClaims(tmp_path), WarmupClaims(tmp_path)
    assert not other.done(KEY)
    one.mark_done(KEY)
    assert other.done(KEY)
    other.mark_done(("127.0.0.1:8501", "m", 2))
    one.forget("127.0.0.1:8500")  # ejected: it may come back as a new process
    assert not other.done(KEY)
    assert one.done(("127.0.0.1:8501", "m", 2))
