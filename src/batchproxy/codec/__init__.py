"""Chooses the wire codec: the compiled `_core` unless BATCHPROXY_NO_EXTENSIONS=1 is set
(or it was not built), else the pure-Python twin `_core_py`. Everything else imports the
codec from here, never from either implementation directly."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

if os.environ.get("BATCHPROXY_NO_EXTENSIONS") == "1":
    from batchproxy.codec import _core_py as _impl

    IMPLEMENTATION = "python"
else:
    try:
        from batchproxy import _core as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "cython"
    except ImportError as exc:  # a build without a C compiler
        log.warning("compiled core unavailable (%s); using the pure-Python core", exc)
        from batchproxy.codec import _core_py as _impl

        IMPLEMENTATION = "python"

CodecError = _impl.CodecError
Tensor = _impl.Tensor
PredictCall = _impl.PredictCall
itemsize = _impl.itemsize
decode_predict_request = _impl.decode_predict_request
encode_predict_request = _impl.encode_predict_request
split_predict_response = _impl.split_predict_response
concat_predict_responses = _impl.concat_predict_responses
decode_predict_response = _impl.decode_predict_response
encode_tensor = _impl.encode_tensor
encode_predict_response = _impl.encode_predict_response
decode_tensor = _impl.decode_tensor
pad_length = _impl.pad_length
json_numbers = _impl.json_numbers

__all__ = [
    "IMPLEMENTATION",
    "CodecError",
    "PredictCall",
    "Tensor",
    "concat_predict_responses",
    "decode_predict_request",
    "decode_predict_response",
    "decode_tensor",
    "encode_predict_request",
    "encode_predict_response",
    "encode_tensor",
    "itemsize",
    "json_numbers",
    "pad_length",
    "split_predict_response",
]
