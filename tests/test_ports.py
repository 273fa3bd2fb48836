"""A port another process holds: one clear line and a non-zero exit, for the gRPC, REST and
monitoring ports; gRPC's port is shared only between the proxy's own --workers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from procs import HOST, Process, child_env, free_port, start_replica
from proxy_procs import start_proxy

from batchproxy import ports, server
from batchproxy.config import ProxyConfig


@pytest.fixture(scope="module")
def first() -> Iterator[Process]:
    """A proxy holding a gRPC, a REST and a monitoring port."""
    with start_replica("identity") as replica, \
            start_proxy([replica], monitoring_port=free_port(), monitoring_host=HOST) as proxy:
        yield proxy


def monitoring_port(proxy: Process) -> int:
    return int(proxy.args[proxy.args.index("--monitoring_port") + 1])


def second_proxy(*flags: str) -> subprocess.CompletedProcess[str]:
    """`batchproxy serve` in front of a replica nobody needs: it must not get that far."""
    return subprocess.run(
        [sys.executable, "-m", "batchproxy", "serve", "--host", HOST,
         "--replica", "127.0.0.1:1", *flags],
        capture_output=True, text=True, timeout=60, env=child_env())


def assert_one_line(proc: subprocess.CompletedProcess[str], port: int, what: str) -> None:
    assert proc.returncode != 0, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [f"batchproxy serve: port {port} ({what}) is already in use"], lines


def test_grpc_port_in_use_with_rest_off(first: Process) -> None:
    # Without so_reuseport 0, this proxy started silently on the first one's gRPC port.
    proc = second_proxy("--port", str(first.port), "--rest_api_port", "0")
    assert_one_line(proc, first.port, "gRPC")


def test_grpc_port_in_use(first: Process) -> None:
    proc = second_proxy("--port", str(first.port), "--rest_api_port", str(free_port()))
    assert_one_line(proc, first.port, "gRPC")


def test_rest_port_in_use(first: Process) -> None:
    assert first.rest_port is not None
    proc = second_proxy("--port", str(free_port()), "--rest_api_port", str(first.rest_port))
    assert_one_line(proc, first.rest_port, "REST")


def test_monitoring_port_in_use(first: Process) -> None:
    port = monitoring_port(first)
    proc = second_proxy("--port", str(free_port()), "--rest_api_port", "0",
                        "--monitoring_host", HOST, "--monitoring_port", str(port))
    assert_one_line(proc, port, "monitoring")


def test_the_first_proxy_still_serves_alone(first: Process) -> None:
    assert first.popen.poll() is None


def test_so_reuseport_only_with_workers() -> None:
    assert ports.reuse_port_option(1) == ("grpc.so_reuseport", 0)
    assert ports.reuse_port_option(4) == ("grpc.so_reuseport", 1)


async def test_grpc_bind_refuses_a_port_a_reuseport_server_holds() -> None:
    # A gRPC server with its default options (SO_REUSEPORT on), as a first proxy's is: past
    # the start-up check (a port taken in between), the proxy's own bind must fail.
    holder = grpc.aio.server()
    port = holder.add_insecure_port(f"{HOST}:0")
    await holder.start()
    try:
        config = ProxyConfig(host=HOST, port=port, rest_api_port=0)
        with pytest.raises(ports.ListenError, match=f"port {port} \\(gRPC\\) is already in use"):
            server.Proxy(config, ["127.0.0.1:1"])
    finally:
        await holder.stop(None)


async def test_rest_bind_error_closes_what_started() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        rest_port = taken.getsockname()[1]
        config = ProxyConfig(host=HOST, port=0, rest_api_port=rest_port, drain_timeout_s=0.5)
        with pytest.raises(ports.ListenError, match=f"port {rest_port} \\(REST\\)"):
            await server.run(config, ["127.0.0.1:1"])


def test_check_free_skips_port_zero() -> None:
    ports.check_free([("gRPC", HOST, 0), ("REST", HOST, 0)])
