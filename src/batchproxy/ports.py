"""The proxy's listening ports: a port another process holds is one clear start-up error, and
ports are shared only between the proxy's own --workers.

gRPC sets SO_REUSEPORT on its listeners by default, so a second proxy would bind the first
one's gRPC port without an error and the kernel would split connections between the two.
Only --workers wants that; every other start turns it off."""

from __future__ import annotations

import errno
import socket


class ListenError(Exception):
    """A port the proxy cannot listen on; the message is the whole explanation."""


def reuse_port_option(workers: int) -> tuple[str, int]:
    """The gRPC server option: SO_REUSEPORT only when workers share the ports."""
    return ("grpc.so_reuseport", 1 if workers > 1 else 0)


def listen_error(host: str, port: int, what: str, cause: BaseException | None = None
                 ) -> ListenError:
    """Why `what` (gRPC, REST, monitoring) cannot listen on host:port, in one line. gRPC only
    says "failed to bind": a plain bind of the same address tells what the reason was."""
    error = cause if isinstance(cause, OSError) else probe(host, port)
    if error is None or error.errno == errno.EADDRINUSE:
        return ListenError(f"port {port} ({what}) is already in use")
    return ListenError(f"cannot listen on {host}:{port} ({what}): {error.strerror or error}")


def probe(host: str, port: int) -> OSError | None:
    """The error binding host:port gives now, or None when it is free. SO_REUSEADDR, as the
    servers set it: a port left in TIME_WAIT by an earlier run is free, a listener is not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return OSError(errno.EADDRNOTAVAIL, str(err))
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            return err
    return None


def check_free(listeners: list[tuple[str, str, int]]) -> None:
    """Raise ListenError for the first (what, host, port) of `listeners` whose port is taken,
    before anything starts (local replicas, forked workers); port 0 (off) is skipped. The
    servers' own binds still report a port taken in between."""
    for what, host, port in listeners:
        if port and (error := probe(host, port)) is not None:
            raise listen_error(host, port, what, error)
