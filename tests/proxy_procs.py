"""Starting a proxy process for integration tests, beside `procs.start_replica`."""

from __future__ import annotations

import sys
from typing import Any

from procs import HOST, Process, flag_args, free_port, start_process


def start_proxy(
    replicas: list[Process] | list[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    **flags: Any,
) -> Process:
    """`batchproxy serve` on free loopback ports in front of `replicas`; `flags` are its
    command-line flags (max_batch_size, batch_timeout_micros, ...)."""
    port, rest_port = free_port(), free_port()
    addresses = [r if isinstance(r, str) else r.address for r in replicas]
    args = [
        sys.executable,
        "-m",
        "batchproxy",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--rest_api_port",
        str(rest_port),
    ]
    for address in addresses:
        args += ["--replica", address]
    args += flag_args(flags)
    return start_process(args, port, rest_port=rest_port, env=env, timeout_s=timeout_s)
