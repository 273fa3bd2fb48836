"""Where replicas come from: a static list, or DNS names re-resolved every interval (every
address a name resolves to is a replica, as a Kubernetes headless Service presents them).

With `dns_server` the A/AAAA queries go to that server (dnspython's resolver: UDP, and TCP
when the answer is truncated); without it the system resolver answers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.nameserver
import dns.resolver

from batchproxy.fleet.slots import ReplicaPool
from batchproxy.supervisor import cancel_and_wait

if TYPE_CHECKING:
    from batchproxy.supervisor import Supervisor

log = logging.getLogger(__name__)


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected NAME:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def query_dns_server(name: str, server: tuple[str, int], timeout_s: float = 2.0,
                           ) -> list[str]:
    """A and AAAA records of `name` from one DNS server, every one of them: an answer too
    large for UDP comes back truncated and is asked again over TCP (dnspython's resolver
    does that), so a headless Service of hundreds of pods resolves in full. A name with no
    records (NXDOMAIN, or no A/AAAA) is an empty list; a server that fails or does not
    answer within `timeout_s` is an OSError."""
    resolver = dns.asyncresolver.Resolver(configure=False)  # not /etc/resolv.conf's servers
    host, port = server
    if not dns.inet.is_address(host):  # dnspython takes the server's IP address only
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        host = str(infos[0][4][0])
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.lifetime = timeout_s

    async def records(rdtype: str) -> list[str]:
        try:
            answer = await resolver.resolve(name, rdtype, search=False,
                                            raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as err:
            raise OSError(f"DNS server {server[0]}:{server[1]}: {err}") from err
        return [rdata.to_text() for rdata in answer]

    a, aaaa = await asyncio.gather(records("A"), records("AAAA"))
    return sorted(set(a + aaaa))  # in a stable order, as the system resolver's below


async def resolve(name: str, dns_server: tuple[str, int] | None) -> list[str]:
    if dns_server is not None:
        return await query_dns_server(name, dns_server)
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def replica_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsDiscovery:
    """Keeps the pool's replicas equal to static addresses plus what the names resolve to."""

    def __init__(self, pool: ReplicaPool, names: list[str], static: list[str],
                 refresh_s: float = 5.0, dns_server: str | None = None) -> None:
        self.pool = pool
        self.names = [split_host_port(name) for name in names]
        self.static = list(static)
        self.refresh_s = refresh_s
        self.dns_server = split_host_port(dns_server) if dns_server else None
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, list[str]] = {}
        self.on_change: list[Callable[[], None]] = []

    async def refresh(self) -> None:
        addresses = list(self.static)
        for host, port in self.names:
            try:
                resolved = await resolve(host, self.dns_server)
            except (OSError, TimeoutError, ValueError) as err:
                # Keep the last answer: a DNS hiccup must not drain a healthy fleet.
                log.warning("resolving %s failed (%s); keeping %d known replicas",
                            host, err, len(self._last.get(host, [])))
                resolved = self._last.get(host, [])
            if resolved != self._last.get(host):
                log.info("%s resolves to %s", host, ", ".join(resolved) or "nothing")
            self._last[host] = resolved
            addresses += [replica_address(ip, port) for ip in resolved]
        before = set(self.pool.replicas)
        self.pool.set_addresses(addresses)
        if set(self.pool.replicas) != before:
            for callback in self.on_change:
                callback()

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Re-resolve every refresh_s: under `supervisor` when given, else as a task of our
        own."""
        if supervisor is not None:
            supervisor.spawn("discovery", self.run)
        else:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """The loop: sleep, re-resolve. A failed round keeps the last answer and waits for
        the next one (DNS outages are routine); only a bug escapes to the supervisor."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("replica discovery failed")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
