"""The text of a REST body that orjson refused: what Python's parser may be given.

orjson refuses invalid UTF-8 and lone surrogates outright; Python's json module, the
fallback for TFS's NaN/Infinity literals, takes both (it decodes bytes with
"surrogatepass" and turns a lone "\\ud800" escape into a lone surrogate). A lone surrogate
is no text: it cannot be encoded as UTF-8, so it could become neither a model, signature or
input name in a protobuf message nor a word of a JSON answer, and it would fail far from
the body that carried it. It is refused here, as TFS's parser (rapidjson) refuses it.
"""

from __future__ import annotations

import re

# A JSON escape of a UTF-16 pair, of a high or a low half alone, or an escaped backslash.
# Matched left to right, an escaped backslash is consumed whole, so `\\ud800` (a backslash,
# then the letters "ud800") is never taken for an escape.
_ESCAPES = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a pair: fine
    r"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"  # half of one, alone
    r"|\\\\"
)


class InvalidText(ValueError):
    """A body that is not text; the message is rapidjson's wording."""


def body_text(body: bytes) -> str:
    """`body` as text for json.loads: strict UTF-8, without lone surrogate escapes."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidText(f"Invalid encoding in string at offset {err.start}.") from None
    if "\\u" in text:
        for match in _ESCAPES.finditer(text):
            if match.group(1):
                raise InvalidText(
                    f"The surrogate pair in string is invalid at offset {match.start()}.")
    return text
