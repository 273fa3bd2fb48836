"""A tiny DNS server on 127.0.0.1 for discovery tests, built on dnspython's message API.

It answers A and AAAA queries for the names it holds, over UDP and TCP on one port, as a
real server does: a UDP answer larger than the query allows (512 bytes, or its EDNS
payload) is cut short with the TC flag set, and the whole answer comes over TCP.

It runs its own event loop in a thread: tests block their own loop at times (starting a
process, a synchronous HTTP call), and a proxy resolving meanwhile must still be answered.

    with DnsServer() as dns:
        dns.set("name.test.", ["10.0.0.1"])
        query_dns_server("name.test.", ("127.0.0.1", dns.port))
"""

from __future__ import annotations

import asyncio
import struct
import threading
from concurrent.futures import Future

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}  # absolute name -> addresses (v4 and v6)
        self.udp_queries = 0
        self.tcp_queries = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread()

    def set(self, name: str, addresses: list[str]) -> None:
        self.records[name] = list(addresses)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        addresses = self.records.get(question.name.to_text())
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        family = ":" if question.rdtype == dns.rdatatype.AAAA else "."
        matching = [a for a in addresses if family in a]
        if matching and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            response.answer.append(dns.rrset.from_text_list(
                question.name, 1, "IN", question.rdtype, matching))
        return response

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> int:
        """Listen on a free port (the same number for UDP and TCP) and return it."""
        ready: Future[int] = Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),),
                                        name="dns-server", daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=10)
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)
            self._loop = None

    async def _serve(self, ready: Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            tcp = await asyncio.start_server(self._serve_tcp, HOST, 0)
            port = tcp.sockets[0].getsockname()[1]
            udp, _ = await self._loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(HOST, port))
        except BaseException as err:
            ready.set_exception(err)
            raise
        ready.set_result(port)
        await self._stopped.wait()
        udp.close()
        tcp.close()
        await tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # RFC 7766: a 2-byte length before each message
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                query = dns.message.from_wire(await reader.readexactly(size))
                self.tcp_queries += 1
                writer.write(self.answer(query).to_wire(prepend_length=True))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        self.server.udp_queries += 1
        limit = max(512, query.payload) if query.edns >= 0 else 512
        wire = self.server.answer(query).to_wire(max_size=limit, prefer_truncation=True)
        assert self.transport is not None
        self.transport.sendto(wire, addr)
