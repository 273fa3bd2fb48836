"""Reference replicas started as child processes: the embedded default of `batchproxy serve`
when no --replica is given, so one command runs the whole thing with no TFS installed.

Plain subprocesses (not asyncio ones): with --workers they are started once, in the parent,
before the workers fork, and must outlive any event loop."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float,
                  process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")
        time.sleep(0.05)


class LocalReplicas:
    """`count` reference replica processes on loopback; stopped with the proxy."""

    def __init__(self, count: int, model_kind: str, model_name: str) -> None:
        self.count = count
        self.model_kind = model_kind
        self.model_name = model_name
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def start(self, timeout_s: float = 60.0) -> list[str]:
        ports = []
        for _ in range(self.count):
            port, rest_port = free_port(), free_port()
            self.processes.append(subprocess.Popen([
                sys.executable, "-m", "batchproxy.replica", "--host", "127.0.0.1",
                "--port", str(port), "--rest_api_port", str(rest_port),
                "--model", self.model_kind, "--model_name", self.model_name,
            ]))
            ports.append(port)
            self.addresses.append(f"127.0.0.1:{port}")
        try:
            for port, process in zip(ports, self.processes, strict=True):
                wait_for_port("127.0.0.1", port, timeout_s, process)
        except BaseException:
            self.stop()
            raise
        log.info("started %d local %s replicas: %s", self.count, self.model_kind,
                 ", ".join(self.addresses))
        return self.addresses

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
