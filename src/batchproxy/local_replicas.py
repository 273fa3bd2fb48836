"""Reference replicas started as child processes: the embedded default of `batchproxy serve`
when no --replica is given, so one command runs the whole thing with no TFS installed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_for_port(host: str, port: int, timeout_s: float,
                        process: asyncio.subprocess.Process | None = None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"process on port {port} exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


class LocalReplicas:
    """`count` reference replica processes on loopback; stopped with the proxy."""

    def __init__(self, count: int, model_kind: str, model_name: str) -> None:
        self.count = count
        self.model_kind = model_kind
        self.model_name = model_name
        self.processes: list[asyncio.subprocess.Process] = []
        self.addresses: list[str] = []

    async def start(self, timeout_s: float = 60.0) -> list[str]:
        ports = []
        for _ in range(self.count):
            port, rest_port = free_port(), free_port()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchproxy.replica",
                "--port", str(port), "--rest_api_port", str(rest_port),
                "--model", self.model_kind, "--model_name", self.model_name,
            )
            self.processes.append(process)
            ports.append(port)
            self.addresses.append(f"127.0.0.1:{port}")
        await asyncio.gather(*(
            wait_for_port("127.0.0.1", port, timeout_s, process)
            for port, process in zip(ports, self.processes, strict=True)
        ))
        log.info("started %d local %s replicas: %s", self.count, self.model_kind,
                 ", ".join(self.addresses))
        return self.addresses

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
