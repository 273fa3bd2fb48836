"""DNS discovery against a real DNS server on a loopback port: records that change while
calls flow add replicas and drain others, and no call fails."""

from __future__ import annotations

import asyncio

import pytest
from dns_server import DnsServer
from grpc_client import batch_rows_histogram
from load import closed_loop
from procs import free_port, start_replica
from proxy_procs import start_proxy

from batchproxy.fleet.discovery import query_dns_server, split_host_port

NAME = "replicas.batchproxy.test."


@pytest.fixture
def dns():
    """A DNS server on loopback; `set` changes its answer for NAME at once."""
    with DnsServer() as server:
        yield server, server.port


async def test_query_dns_server_reads_a_records(dns):
    resolver, port = dns
    resolver.set(NAME, ["127.0.0.2", "127.0.0.3"])
    assert sorted(await query_dns_server(NAME, ("127.0.0.1", port))) == ["127.0.0.2",
                                                                         "127.0.0.3"]
    assert split_host_port("name.svc:8500") == ("name.svc", 8500)


async def test_changing_records_add_and_drain_replicas_without_a_failed_call(dns):
    resolver, dns_port = dns
    port = free_port("127.0.0.2")
    first = start_replica("identity", host="127.0.0.2", port=port, batch_cost_ms=2)
    second = start_replica("identity", host="127.0.0.3", port=port, batch_cost_ms=2)
    resolver.set(NAME, ["127.0.0.2"])
    proxy = start_proxy([], replicas_dns=f"{NAME.rstrip('.')}:{port}",
                        dns_server=f"127.0.0.1:{dns_port}", dns_refresh_s=0.2,
                        health_interval_ms=200)
    try:
        load = asyncio.ensure_future(closed_loop(proxy.address, callers=40, duration_s=6))
        await asyncio.sleep(1.5)
        assert batch_rows_histogram(second.rest_url).get("count", 0) == 0
        resolver.set(NAME, ["127.0.0.2", "127.0.0.3"])  # scale up
        await asyncio.sleep(1.5)
        assert batch_rows_histogram(second.rest_url)["count"] > 0
        resolver.set(NAME, ["127.0.0.3"])  # the first one leaves
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
