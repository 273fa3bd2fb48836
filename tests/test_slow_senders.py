"""A slow REST sender cannot hold a connection forever: headers and body have deadlines."""

from __future__ import annotations

import socket
import time

import pytest
from procs import start_replica
from proxy_procs import start_proxy


@pytest.fixture(scope="module")
def proxy():
    replica = start_replica("identity")
    proxy = start_proxy([replica], rest_header_timeout_s=1, rest_body_timeout_s=1)
    yield proxy
    proxy.stop()
    replica.stop()


def read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks)


def test_headers_that_never_finish_lose_the_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.rest_port)) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/models/identity:predict HTTP/1.1\r\nHost: x\r\n")
        # ... and nothing more: the proxy closes the connection after its header timeout.
        read_all(sock, 10)
        assert time.monotonic() - started < 5


def test_a_body_that_never_arrives_gets_408(proxy):
    with socket.create_connection(("127.0.0.1", proxy.rest_port)) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/models/identity:predict HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inst")
        answer = read_all(sock, 10)
        assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error"' in answer
