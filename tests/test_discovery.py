"""DNS discovery against a real DNS server on a loopback port: records that change while
calls flow add replicas and drain others, and no call fails."""

from __future__ import annotations

import asyncio
import threading

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer
from grpc_client import batch_rows_histogram
from load import closed_loop
from procs import free_port, start_replica
from proxy_procs import start_proxy

from batchproxy.fleet.discovery import query_dns_server, split_host_port

NAME = "replicas.batchproxy.test."


class ChangingResolver(BaseResolver):
    """Answers A queries for NAME with whatever addresses the test sets now."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.addresses: list[str] = []

    def set(self, addresses: list[str]) -> None:
        with self.lock:
            self.addresses = list(addresses)

    def resolve(self, request, handler):
        reply = request.reply()
        question = request.q
        if str(question.qname) == NAME and question.qtype == QTYPE.A:
            with self.lock:
                for address in self.addresses:
                    reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture
def dns():
    resolver = ChangingResolver()
    port = free_port()
    server = DNSServer(resolver, port=port, address="127.0.0.1")
    server.start_thread()
    yield resolver, port
    server.stop()


async def test_query_dns_server_reads_a_records(dns):
    resolver, port = dns
    resolver.set(["127.0.0.2", "127.0.0.3"])
    assert sorted(await query_dns_server(NAME, ("127.0.0.1", port))) == ["127.0.0.2",
                                                                         "127.0.0.3"]
    assert split_host_port("name.svc:8500") == ("name.svc", 8500)


async def test_changing_records_add_and_drain_replicas_without_a_failed_call(dns):
    resolver, dns_port = dns
    port = free_port("127.0.0.2")
    first = start_replica("identity", host="127.0.0.2", port=port, batch_cost_ms=2)
    second = start_replica("identity", host="127.0.0.3", port=port, batch_cost_ms=2)
    resolver.set(["127.0.0.2"])
    proxy = start_proxy([], replicas_dns=f"{NAME.rstrip('.')}:{port}",
                        dns_server=f"127.0.0.1:{dns_port}", dns_refresh_s=0.2,
                        health_interval_ms=200)
    try:
        load = asyncio.ensure_future(closed_loop(proxy.address, callers=40, duration_s=6))
        await asyncio.sleep(1.5)
        assert batch_rows_histogram(second.rest_url).get("count", 0) == 0
        resolver.set(["127.0.0.2", "127.0.0.3"])  # scale up
        await asyncio.sleep(1.5)
        assert batch_rows_histogram(second.rest_url)["count"] > 0
        resolver.set(["127.0.0.3"])  # the first one leaves
        await asyncio.sleep(1.0)
        drained_at = batch_rows_histogram(first.rest_url)["count"]
        await asyncio.sleep(1.0)
        assert batch_rows_histogram(first.rest_url)["count"] == drained_at
        result = await load
        proxy_log = proxy.output()
    finally:
        proxy.stop()
        first.stop()
        second.stop()
    assert result.wrong == 0
    assert result.failed == 0, result.error_messages
    assert result.ok > 500
    assert "drained and dropped" in proxy_log
