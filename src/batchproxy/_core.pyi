"""Typing stub shared by the compiled core (`_core.pyx`) and its pure-Python twin (`_core_py.py`).

The core works on serialized protobuf bytes. Requests are decoded into `PredictCall`s whose
input tensors are normalized to raw little-endian element bytes (or a list of byte strings for
DT_STRING), whatever encoding the client used, so the batcher can slice and merge rows cheaply.
Responses are never normalized: `split_predict_response` cuts the encoding the replica chose.
"""

class CodecError(ValueError):
    """Input the codec refuses. `code` is a grpc.StatusCode name such as "INVALID_ARGUMENT"."""

    code: str
    message: str
    def __init__(self, code: str, message: str) -> None: ...

class Tensor:
    dtype: int  # tensorflow.DataType value
    shape: tuple[int, ...]
    # Every element, row-major: little-endian bytes for fixed-width dtypes, or one bytes
    # object per element for DT_STRING.
    data: bytes | list[bytes]
    def __init__(self, dtype: int, shape: tuple[int, ...], data: bytes | list[bytes]) -> None: ...

class PredictCall:
    model_name: str
    version: int | None
    version_label: str | None
    signature_name: str
    output_filter: tuple[str, ...]
    model_spec: bytes  # the ModelSpec exactly as the client serialized it
    inputs: dict[str, Tensor]
    # Shared dimension 0 of every input; -1 when the call cannot be batched (no inputs, a
    # scalar input, inputs that disagree on dimension 0, a valid dtype the core does not
    # batch such as DT_RESOURCE, DT_VARIANT, the float8/int4 types or a _REF type, or a
    # fill-form tensor past the request's fill budget). Never -1 for malformed input:
    # decode_predict_request refuses that.
    rows: int
    # (model_name, version, version_label, signature_name,
    #  ((input_name, dtype, inner_shape), ... sorted by name), output_filter)
    key: tuple
    # Built by decode_predict_request; also constructible (tests, the REST layer). rows and
    # key are derived from the inputs unless given.
    def __init__(
        self,
        model_name: str = "",
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "",
        output_filter: tuple[str, ...] = (),
        model_spec: bytes = b"",
        inputs: dict[str, Tensor] | None = None,
        rows: int | None = None,
        key: tuple | None = None,
    ) -> None: ...

def itemsize(dtype: int) -> int:
    """Bytes per element in tensor_content form; 0 for DT_STRING; -1 for unsupported dtypes."""

def decode_predict_request(data: bytes) -> PredictCall:
    """Parse a serialized PredictRequest. Raises CodecError("INVALID_ARGUMENT", message):

    - "Could not parse PredictRequest: ..." when the bytes are not the wire format
      (truncation, overlong varints, lengths past the end, bad UTF-8, bad groups); the
      compiled core adds "input NAME: " when the damage is inside an input's tensor.
    - "tensor parsing error: NAME: DETAIL" for an input that is no concrete tensor, checked
      in this order: more than 254 dimensions; a dtype that is no tensorflow.DataType value
      (valid: 1..33 and their _REF variants 101..133; DT_INVALID is not); unknown_rank set;
      a negative dimension (-1 included); non-zero dimensions whose product exceeds
      2**31 - 1 (this also bounds int64 overflow); tensor_content whose length is not the
      element count times the item size; more typed values than elements; an odd number of
      complex components; a string tensor_content that does not decode.
    - "tensor parsing error: NAME: the inputs map holds this key more than once" for a
      repeated key in the inputs map (protobuf would keep the last; the proxy refuses).

    Wire errors come first, then a repeated key, then the first bad input in wire order.
    Nothing is allocated from a size the client claimed before these checks, and TF's fill
    rule (fewer typed values than elements) expands at most 256 MiB per request; a tensor
    past that budget is kept as sent and the call gets rows = -1 (forwarded unbatched)."""

def encode_predict_request(
    pieces: list[tuple[PredictCall, int, int]], pad_rows: int = 0
) -> bytes:
    """One PredictRequest holding rows [start, stop) of each call, concatenated along
    dimension 0 in order, then `pad_rows` copies of the last row sent (padding up to an
    allowed batch size; CodecError("INTERNAL") when there is no row to copy). All calls
    share one key; model_spec and output_filter come from the first. Numeric inputs travel
    as tensor_content, strings as string_val."""

def pad_length(tensor: Tensor, length: int, pad: bytes) -> Tensor:
    """`tensor` (rank 2 or more) with dimension 1 padded to `length` with the element `pad`
    (its little-endian bytes, or for DT_STRING the string itself) after each row's own
    elements: variable-length inputs made one length. CodecError("INTERNAL") for a shorter
    length, a lower rank or a pad element of the wrong size."""

def split_predict_response(data: bytes, rows: list[int]) -> list[bytes]:
    """Cut a serialized PredictResponse along dimension 0 into len(rows) responses of
    rows[i] rows each, keeping the replica's encoding and echoing its model_spec.
    Raises CodecError("FAILED_PRECONDITION", ...) when an output's dimension 0 is not
    sum(rows) or it cannot be cut (no dimension 0, an unknown dimension, a dtype the core
    does not batch), CodecError("INTERNAL", ...) when the bytes do not parse or an output is
    malformed (payload against shape, more than 254 dimensions, a shape past 2**31 - 1
    elements, a partial fill too large to expand)."""

def decode_predict_response(data: bytes) -> tuple[dict[str, Tensor], int | None]:
    """(outputs, version) of a serialized PredictResponse, without protobuf objects: every
    output in normalized form (as decode_tensor gives it; typed values and tensor_content
    alike, TF's fill rule applied), keyed and ordered by name (a repeated key keeps its last
    value, as protobuf does), and the ModelSpec's version when it names one (else None).
    Raises CodecError("INTERNAL", ...): "Could not parse PredictResponse: ..." when the bytes
    are not the wire format (the ModelSpec included), "output NAME: DETAIL" for an output
    that is no concrete tensor (decode_predict_request's checks) or a partial fill past the
    256 MiB budget ("too large to expand"). A valid dtype the core does not batch comes back
    with the shape and no data, as decode_tensor gives it."""

def concat_predict_responses(parts: list[bytes]) -> bytes:
    """Join responses for consecutive row ranges of one request back into one response,
    along dimension 0, in the encoding of the first part that has rows (a part of no rows
    carries no payload to tell typed from tensor_content)."""

def encode_tensor(
    dtype: int, shape: tuple[int, ...], data: bytes | list[bytes], typed: bool
) -> bytes:
    """A serialized TensorProto: typed fields (float_val, int_val, ...) when `typed`, else
    tensor_content (strings always use string_val)."""

def encode_predict_response(outputs: dict[str, bytes], model_spec: bytes) -> bytes:
    """A serialized PredictResponse from serialized TensorProtos and a serialized ModelSpec."""

def decode_tensor(data: bytes) -> Tensor:
    """Parse one serialized TensorProto into normalized form (either encoding). Applies the
    checks of decode_predict_request ("tensor parsing error: DETAIL")."""

def json_numbers(dtype: int, shape: tuple[int, ...], data: bytes) -> bytes | None:
    """The JSON text of a numeric tensor in normalized form, nested by `shape` (a scalar for
    shape ()), exactly as orjson writes the numpy array: integers in decimal, booleans as
    true/false, floats in their shortest form that reads back as the same value (float32's
    own for DT_FLOAT), laid out plain for point positions -5..13 (float32) or -4..16
    (float64) and as 1.5e+16 / 1e-7 beyond. None, for the caller's other path, when the
    dtype is none of float, double, int8/16/32/64, uint8/32/64 and bool, when a value is NaN
    or infinite (TFS spells those out), when a dimension is 0, or when `data` is not bytes
    of the shape's size."""
