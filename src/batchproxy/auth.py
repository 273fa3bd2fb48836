"""Optional bearer-token authentication (--auth_token_file): a call must carry
`authorization: Bearer <token>` (gRPC metadata or HTTP header), else it is refused with
UNAUTHENTICATED / 401 before any work is queued. Compared in constant time; the token is
never logged."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path


class TokenAuth:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        return cls(Path(path).read_text().strip())

    def __repr__(self) -> str:  # never show the token
        return "TokenAuth(<redacted>)"

    def accepts(self, header: str | bytes | None) -> bool:
        if header is None:
            return False
        if isinstance(header, str):
            header = header.encode()
        return hmac.compare_digest(header, self._expected)

    def accepts_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return self.accepts(value)
        return False


UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
