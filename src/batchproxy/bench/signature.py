"""What the bench sends by default: the inputs the model's own signature asks for, read with
GetModelMetadata (gRPC) or GET /v1/models/NAME/metadata (REST) before the load starts, so a
bare `batchproxy bench` against any model sends calls that model accepts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from batchproxy.methods import GET_MODEL_METADATA
from batchproxy.protos import get_model_metadata_pb2

METADATA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class InputSpec:
    """One input of the request: tensorflow.DataType and the shape of one row."""

    dtype: int
    row_shape: tuple[int, ...]


class SignatureError(Exception):
    """The signature could not be read; the message says why (code and server's words)."""


def row_shape(dims: list[int]) -> tuple[int, ...]:
    """A signature's shape without its batch dimension; unknown sizes (-1) become 1."""
    return tuple(size if size >= 0 else 1 for size in dims[1:])


def inputs_of(signature_map: get_model_metadata_pb2.SignatureDefMap, signature: str
              ) -> dict[str, InputSpec]:
    found = signature_map.signature_def.get(signature)
    if found is None:
        known = ", ".join(sorted(signature_map.signature_def)) or "none"
        raise SignatureError(f"the model has no signature {signature!r} (it has: {known})")
    return {name: InputSpec(info.dtype, row_shape([dim.size for dim in info.tensor_shape.dim])
                            if not info.tensor_shape.unknown_rank else (1,))
            for name, info in sorted(found.inputs.items())}


def grpc_signature_map(target: str, model: str, timeout_s: float
                       ) -> get_model_metadata_pb2.SignatureDefMap:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            GET_MODEL_METADATA, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=get_model_metadata_pb2.GetModelMetadataResponse.FromString)
        try:
            response = method(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise SignatureError(f"{err.code().name}: {err.details()}") from None
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    packed = response.metadata.get("signature_def")
    if packed is None or not packed.Unpack(signature_map):
        raise SignatureError("GetModelMetadata answered without a signature_def map")
    return signature_map


def rest_signature_map(target: str, model: str, timeout_s: float
                       ) -> get_model_metadata_pb2.SignatureDefMap:
    url = f"http://{target}/v1/models/{model}/metadata"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise SignatureError(f"HTTP {err.code}: {err.read().decode(errors='replace')}") from None
    except (OSError, ValueError) as err:
        raise SignatureError(f"{type(err).__name__}: {err}") from None
    try:
        packed = document["metadata"]["signature_def"]
        return json_format.ParseDict(packed, get_model_metadata_pb2.SignatureDefMap(),
                                     ignore_unknown_fields=True)
    except (KeyError, TypeError, json_format.ParseError) as err:
        raise SignatureError(f"metadata without a signature_def map: {err}") from None


def fetch_inputs(target: str, protocol: str, model: str, signature: str,
                 timeout_s: float = METADATA_TIMEOUT_S) -> dict[str, InputSpec]:
    """The inputs of `model`'s `signature`, asked of `target`; raises SignatureError."""
    fetch = grpc_signature_map if protocol == "grpc" else rest_signature_map
    return inputs_of(fetch(target, model, timeout_s), signature or "serving_default")
