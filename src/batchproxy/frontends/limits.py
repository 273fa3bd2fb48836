"""What one client call may carry (--max_rows_per_request, --max_rank), checked by both
frontends on the decoded call before it is queued or forwarded."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from batchproxy import codec
from batchproxy.errors import ProxyError


@dataclass(frozen=True)
class RequestLimits:
    max_rows: int = 1 << 16
    # TF itself stops at 254 dimensions; real models use a handful.
    max_rank: int = 32

    def check(self, call: codec.PredictCall) -> None:
        if call.rows > self.max_rows:
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request has {call.rows} rows; the limit is "
                             f"{self.max_rows} (--max_rows_per_request)")
        for name, tensor in call.inputs.items():
            if len(tensor.shape) > self.max_rank:
                raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input {name} has {len(tensor.shape)} dimensions; the limit "
                                 f"is {self.max_rank} (--max_rank)")
