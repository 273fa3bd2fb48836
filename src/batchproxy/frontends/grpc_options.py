"""The gRPC server's queue limits, derived from the proxy's own admission limits.

grpcio queues calls that reached the server but that the application has not asked for
yet ("pending requests"). grpc.aio asks for one call per turn of the event loop, so a burst
of a few thousand calls sits in that queue for a moment, and by default grpc core starts
refusing what is queued beyond 1000 (randomly, then all past 3000). Those calls end as a
bare CANCELLED that the proxy never sees, counts or explains. The proxy's own admission
(`--max_enqueued_rows`, `--max_forwarded_calls`) is what must answer overload, with
UNAVAILABLE, so grpc core's queue is made deep enough to hold any burst the proxy would
admit or refuse itself.
"""

from __future__ import annotations

from batchproxy.config import ProxyConfig

# Calls grpc core may hold unseen, per call the proxy can hold at once: the rest of a burst
# waits there only until the event loop reaches it and the admission refuses it.
BURST_FACTOR = 4
# However small the proxy's queues, a burst of this many calls is still answered by the
# proxy. An unseen call costs grpc core its stream and headers only: its body waits in the
# connection's flow-control window.
MIN_PENDING = 1 << 14
# grpc's channel arguments are C ints.
INT32_MAX = (1 << 31) - 1

PENDING_REQUESTS = "grpc.server.max_pending_requests"
PENDING_REQUESTS_HARD_LIMIT = "grpc.server.max_pending_requests_hard_limit"
MAX_CONCURRENT_STREAMS = "grpc.max_concurrent_streams"


def admitted_calls(config: ProxyConfig) -> int:
    """The most calls the proxy can hold at once: every batched call takes at least one
    queued row, and unbatched calls have their own bound."""
    batching = config.batching
    return batching.max_enqueued_rows + batching.max_forwarded_calls


def pending_limit(config: ProxyConfig) -> int:
    return min(max(BURST_FACTOR * admitted_calls(config), MIN_PENDING), INT32_MAX)


def queue_limits(config: ProxyConfig) -> list[tuple[str, int]]:
    """Channel arguments for grpc core's queues of calls the proxy has not seen yet."""
    pending = pending_limit(config)
    return [
        # Soft limit equal to the hard one: no random early refusals below it.
        (PENDING_REQUESTS, pending),
        (PENDING_REQUESTS_HARD_LIMIT, pending),
        # One connection alone can never fill the pending queue: a client's channel keeps
        # its calls beyond this many streams until one of its streams ends.
        (MAX_CONCURRENT_STREAMS, pending),
    ]
