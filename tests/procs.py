"""Real processes on loopback for integration tests: free ports, spawn, wait until ready,
stop. Generic (`start_process`) so proxy tests can use it too; `start_replica` starts the
reference replica (`python -m batchproxy.replica`).

    with start_replica("demo", batch_cost_ms=5) as replica:
        channel = grpc.insecure_channel(replica.address)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SRC = Path(__file__).resolve().parents[1] / "src"
HOST = "127.0.0.1"


# Every port free_port() handed out in this run.
_handed_out: set[int] = set()


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now, and not one handed out before in this run: two calls
    in a row (a server's gRPC and REST ports) may otherwise get the same port back from the
    kernel, since neither is bound until the child starts. Another process may still take it
    before the child binds: the replica refuses a taken port (no SO_REUSEPORT), so such a
    race fails loudly."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            break
    _handed_out.add(port)
    return port


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class Process:
    """A child process and the ports it serves. Stop it with `.stop()` or a `with` block."""

    popen: subprocess.Popen[bytes]
    port: int
    rest_port: int | None = None
    args: list[str] = field(default_factory=list)
    log: IO[bytes] | None = None
    host: str = HOST

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        if self.log is None:
            return ""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.log is not None and not self.log.closed:
            self.log.close()
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with this checkout's src first on the path (so a child runs the
    code under test even without an install) and unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_process(
    args: list[str],
    ready_port: int,
    *,
    rest_port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    host: str = HOST,
) -> Process:
    """Start `args` (argv) and return once `ready_port` (and `rest_port`, if given) accepts
    connections. Output goes to a temporary file (a pipe could fill and block the child);
    if the child exits or never gets ready, it is stopped and its output is in the error."""
    # Closed by Process.stop(): the file lives as long as the process, not a `with` block.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115
        prefix="batchproxy-proc-", suffix=".log", delete=False
    )
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=child_env(env))
    proc = Process(popen, ready_port, rest_port, list(args), log, host)
    deadline = time.monotonic() + timeout_s
    waiting = [p for p in (ready_port, rest_port) if p]
    while waiting:
        if popen.poll() is not None:
            output = proc.output()
            proc.stop()
            raise RuntimeError(f"{args} exited with {popen.returncode}:\n{output}")
        if time.monotonic() > deadline:
            output = proc.output()
            proc.stop()
            raise TimeoutError(f"{args} not listening on {waiting} after {timeout_s}s:\n{output}")
        if port_open(waiting[0], host):
            waiting.pop(0)
        else:
            time.sleep(0.05)
    return proc


def flag_args(flags: dict[str, Any]) -> list[str]:
    """{"batch_cost_ms": 5, "enable_serialization_as_tensor_content": True} -> argv.
    True gives a bare flag; False and None leave the flag out."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is not True:
            argv.append(str(value))
    return argv


def start_replica(
    model: str = "identity",
    *,
    port: int | None = None,
    rest_port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    host: str = HOST,
    **flags: Any,
) -> Process:
    """A reference replica on free loopback ports; `flags` are its command-line flags
    (model_name, model_version, batch_cost_ms, row_cost_us, ...)."""
    port = port or free_port(host)
    rest_port = rest_port or free_port(host)
    args = [
        sys.executable,
        "-m",
        "batchproxy.replica",
        "--host",
        host,
        "--port",
        str(port),
        "--rest_api_port",
        str(rest_port),
        "--model",
        model,
        *flag_args(flags),
    ]
    return start_process(args, port, rest_port=rest_port, env=env, timeout_s=timeout_s,
                         host=host)
