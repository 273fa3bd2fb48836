"""The one retry policy, for batches and forwarded calls alike: a call that failed because of
its replica (UNAVAILABLE, a stream reset, or no answer within the time its callers could
wait) is tried again on another replica, at most `max_retries` times, and only while a
replica other than the failed one could serve it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import is_replica_failure


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 1

    def retryable(self, error: ProxyError, timed_out_for_us: bool) -> bool:
        """`timed_out_for_us`: DEADLINE_EXCEEDED came from a timeout the proxy set, not from
        a caller's deadline, so a caller still waits and the replica is to blame."""
        if is_replica_failure(error):
            return True
        return timed_out_for_us and error.code is grpc.StatusCode.DEADLINE_EXCEEDED

    def should_retry(self, error: ProxyError, retries: int, timed_out_for_us: bool) -> bool:
        return retries < self.max_retries and self.retryable(error, timed_out_for_us)
