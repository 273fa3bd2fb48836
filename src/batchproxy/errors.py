"""The one error type that crosses module boundaries: a gRPC status code and a message.

Frontends turn it into a gRPC status or an HTTP error body; the batcher and the pool raise
it. Messages are cut at 1024 characters, as TFS cuts them."""

from __future__ import annotations

import grpc

MAX_MESSAGE_CHARS = 1024
# What a caller hears of a bug in the proxy: the exception itself goes to the log only.
INTERNAL_ERROR_MESSAGE = "batchproxy internal error (the proxy's log has the details)"


class ProxyError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = message[:MAX_MESSAGE_CHARS]
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ProxyError({self.code.name}, {self.message!r})"

    @classmethod
    def from_rpc_error(cls, err: grpc.aio.AioRpcError) -> ProxyError:
        """Keep a replica's code and message so its callers see what TFS said."""
        return cls(err.code(), err.details() or err.code().name)

    @classmethod
    def from_codec_error(cls, err: Exception) -> ProxyError:
        code_name = getattr(err, "code", "INVALID_ARGUMENT")
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
        return cls(code, getattr(err, "message", str(err)))
