"""Call priorities: `critical` (the default) and `sheddable`, named by the caller in gRPC
metadata or an HTTP header of the same name; a call that names none gets its model's
default class (`priority` in --proxy_config_file; critical without one). Shared by the
frontends, which parse it, and the engine, which orders and sheds by it; neither imports
the other for it."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import grpc

from batchproxy.errors import ProxyError

# gRPC metadata keys are lowercase; HTTP headers are matched case-insensitively.
METADATA_KEY = "x-batchproxy-priority"
HEADER = "X-Batchproxy-Priority"


class Priority(enum.Enum):
    CRITICAL = "critical"
    SHEDDABLE = "sheddable"


def parse_priority(value: str | bytes | None,
                   default: Priority | None = Priority.CRITICAL) -> Priority | None:
    """The priority a header or metadata value names (None or empty: `default`; the
    frontends pass None, so the engine applies the model's default); any other value is
    the caller's mistake, refused rather than guessed at."""
    if value is None:
        return default
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value.strip().lower()
    if not text:
        return default
    try:
        return Priority(text)
    except ValueError:
        raise ProxyError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Invalid {HEADER} value {value[:64]!r}: expected 'critical' or 'sheddable'"
        ) from None


def priority_of_metadata(metadata: Iterable[tuple[str, str | bytes]] | None,
                         default: Priority | None = Priority.CRITICAL) -> Priority | None:
    """The priority in a gRPC call's invocation metadata (the last value wins, as for HTTP
    headers that repeat); `default` when it names none."""
    found: str | bytes | None = None
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            found = value
    return parse_priority(found, default)
