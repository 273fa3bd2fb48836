"""--dns_server discovery against a DNS server on loopback: answers too large for UDP."""

from __future__ import annotations

import ipaddress

import pytest
from dns_server import DnsServer

from batchproxy.fleet.discovery import query_dns_server

NAME = "tfs-headless.batchproxy.test."


@pytest.fixture
def dns():
    with DnsServer() as server:
        yield server


async def test_two_hundred_pods_resolve_in_full_over_tcp(dns):
    pods = [str(ipaddress.IPv4Address("10.1.0.0") + i) for i in range(200)]
    dns.set(NAME, pods)
    addresses = await query_dns_server(NAME, ("127.0.0.1", dns.port))
    assert sorted(addresses, key=ipaddress.ip_address) == pods
    # The UDP answer was truncated; the whole one came over TCP.
    assert dns.udp_queries >= 1 and dns.tcp_queries >= 1


async def test_a_small_answer_stays_on_udp_and_aaaa_records_count(dns):
    dns.set(NAME, ["10.1.0.1", "fd00::1"])
    assert sorted(await query_dns_server(NAME, ("127.0.0.1", dns.port))) == ["10.1.0.1",
                                                                             "fd00::1"]
    assert dns.tcp_queries == 0


async def test_an_unknown_name_resolves_to_nothing(dns):
    assert await query_dns_server("nobody.batchproxy.test.", ("127.0.0.1", dns.port)) == []


async def test_a_server_that_never_answers_is_an_os_error(dns):
    dns.stop()  # nothing listens on the port any more
    with pytest.raises(OSError, match="DNS server"):
        await query_dns_server(NAME, ("127.0.0.1", dns.port), timeout_s=0.5)
