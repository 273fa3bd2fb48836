"""Variable-length batching, opt-in per input (`--variable_length_inputs tokens:0`).

Text and audio models take `[batch, length]` inputs whose length differs per call. The
codec's batch key holds every inner dimension, so such calls would never share a batch.
Here the length (dimension 1) of a named input leaves the key: it is replaced by its
length bucket (`--length_buckets 32,64,...`: a call of length 40 shares batches only with
lengths 33..64, so it never waits in, or pads to, a batch of 256), or by nothing without
buckets. A batch's calls are padded to its longest with the input's pad value (TFS pads
with the tensor's first element, which corrupts a model that masks by a pad id), and
outputs that follow the length (`--length_following_outputs out:1=tokens`) are cut back to
each caller's own length before the caller sees them."""

from __future__ import annotations

import bisect

import numpy as np

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.config import BatchingConfig
from batchproxy.protos import predict_pb2

Piece = tuple[codec.PredictCall, int, int]


class Lengths:
    def __init__(self, config: BatchingConfig) -> None:
        self.pads = dict(config.variable_length_inputs)
        self.buckets = config.length_buckets
        # output -> (axis, input)
        self.follow = {out: (axis, name) for out, axis, name in config.length_following_outputs}
        self._pad_bytes: dict[tuple[str, int], bytes] = {}

    def bucket(self, length: int) -> int:
        """The key part a length maps to: its bucket's upper bound; past the last bucket the
        exact length; 0 (any) without buckets."""
        if not self.buckets:
            return 0
        at = bisect.bisect_left(self.buckets, length)
        return self.buckets[at] if at < len(self.buckets) else length

    def key(self, call: codec.PredictCall) -> tuple:
        """The batch key with each variable input's length replaced by its bucket."""
        key = call.key
        sig = key[4]
        changed = False
        parts = []
        for name, dtype, inner in sig:
            if name in self.pads and inner and self._can_pad(name, dtype):
                # A negative mark: a bucket never compares equal to a real dimension.
                inner = (-1 - self.bucket(inner[0]), *inner[1:])
                changed = True
            parts.append((name, dtype, inner))
        if not changed:
            return key
        return (*key[:4], tuple(parts), *key[5:])

    def _can_pad(self, name: str, dtype: int) -> bool:
        """A pad value that fits the dtype (a text pad fits only a string input); else the
        input keeps its exact length in the key, so it is never padded."""
        try:
            self.pad_element(name, dtype)
        except (codec.CodecError, KeyError, ValueError, OverflowError):
            return False
        return True

    def pad_element(self, name: str, dtype: int) -> bytes:
        cached = self._pad_bytes.get((name, dtype))
        if cached is None:
            value = self.pads[name]
            if dtype == dtypes.DT_STRING:
                # The default pad 0 of a string input is the empty string.
                cached = (value.encode() if isinstance(value, str)
                          else b"" if value == 0 else f"{value:g}".encode())
            elif isinstance(value, str):
                raise codec.CodecError("FAILED_PRECONDITION", f"input {name}: pad value "
                                       f"{value!r} is not a number")
            else:
                cached = np.array([value]).astype(dtypes.NUMPY_DTYPES[dtype]).tobytes()
            self._pad_bytes[(name, dtype)] = cached
        return cached

    def pad(self, pieces: list[Piece]) -> list[Piece]:
        """The pieces with every variable input padded to the longest among them (calls
        already that long are sent as they are)."""
        longest: dict[str, int] = {}
        for call, _, _ in pieces:
            for name in self.pads:
                tensor = call.inputs.get(name)
                if tensor is not None and len(tensor.shape) >= 2:
                    longest[name] = max(longest.get(name, 0), tensor.shape[1])
        if not longest:
            return pieces
        out: list[Piece] = []
        for call, start, stop in pieces:
            inputs = dict(call.inputs)
            padded = False
            for name, length in longest.items():
                tensor = inputs[name]
                if tensor.shape[1] != length:
                    inputs[name] = codec.pad_length(
                        tensor, length, self.pad_element(name, tensor.dtype))
                    padded = True
            if padded:
                call = codec.PredictCall(
                    call.model_name, call.version, call.version_label, call.signature_name,
                    call.output_filter, call.model_spec, inputs, call.rows)
            out.append((call, start, stop))
        return out

    def trim(self, response: bytes, call: codec.PredictCall) -> bytes:
        """One caller's part of an answer with every length-following output cut back to the
        caller's own length; other outputs as computed."""
        if not self.follow:
            return response
        message = predict_pb2.PredictResponse.FromString(response)
        outputs: dict[str, bytes] = {}
        changed = False
        for name, proto in message.outputs.items():
            raw = proto.SerializeToString()
            follows = self.follow.get(name)
            tensor_in = call.inputs.get(follows[1]) if follows else None
            if follows is not None and tensor_in is not None and len(tensor_in.shape) >= 2:
                axis, length = follows[0], tensor_in.shape[1]
                tensor = codec.decode_tensor(raw)
                if axis < len(tensor.shape) and tensor.shape[axis] > length:
                    array = dtypes.to_numpy(tensor.dtype, tensor.shape, tensor.data)
                    cut = np.take(array, np.arange(length), axis=axis)
                    data: bytes | list[bytes] = (list(cut.ravel()) if tensor.dtype
                                                 == dtypes.DT_STRING else cut.tobytes())
                    raw = codec.encode_tensor(tensor.dtype, cut.shape, data,
                                              not proto.tensor_content)
                    changed = True
            outputs[name] = raw
        if not changed:
            return response
        spec = message.model_spec.SerializeToString() if message.HasField("model_spec") else b""
        return codec.encode_predict_response(outputs, spec)
