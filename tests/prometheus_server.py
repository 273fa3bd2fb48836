"""A real Prometheus server (Debian's `prometheus`) on loopback for scrape tests.

    with Prometheus([target]) as prometheus:  # its folder and process go on every path

Call `prometheus_binary()` before starting what it scrapes: it skips the test when
Prometheus is not installed, and a skip must not leave a proxy behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest
import requests
from procs import HOST, free_port, port_open


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's package")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return binary


class Prometheus:
    def __init__(self, targets: list[str], scrape_interval_s: float = 0.5) -> None:
        binary = prometheus_binary()  # may skip: before anything exists to clean up
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="batchproxy-prometheus-"))
        try:
            self._start(binary, targets, scrape_interval_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, binary: str, targets: list[str], scrape_interval_s: float) -> None:
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {int(scrape_interval_s * 1000)}ms\n"
            "scrape_configs:\n"
            "  - job_name: batchproxy\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
        self.port = free_port()
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={HOST}:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "log").read_text())
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def query(self, promql: str) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": promql},
                                timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, timeout_s: float = 15) -> float | None:
        """Poll until the query equals `expected` (scrapes arrive in their own time)."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(promql)
            if value == expected:
                return value
            time.sleep(0.25)
        return value

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            if self.log is not None:
                self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
