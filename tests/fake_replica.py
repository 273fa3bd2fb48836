"""A small in-process TFS stand-in for REST tests that need what the reference replica does
not serve: string inputs, several outputs, other dtypes, and Classify/Regress answers.

Model `multi` (version 3), three signatures:
  serving_default: text DT_STRING [-1], x DT_FLOAT [-1,2]
                   -> text_bytes (text as is), upper (text upper-cased), x2 (x * 2),
                      count (len(text), DT_INT64)
  lengths:         text DT_STRING [-1] -> count DT_INT64 [-1]
  types:           b DT_BOOL, i DT_INT32, u DT_UINT64, d DT_DOUBLE (all [-1]) -> the same
Classify: one class list per example, [("ex<i>", p)] with p the example's float feature "p".
Regress: per example, its float feature "x" plus the context's feature "bias" (0 if absent).

A synchronous grpc.server on its own threads, so any test (and any event loop) can use it.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np

from batchproxy import core, dtypes
from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    signature_pb2,
)

MODEL = "multi"
VERSION = 3
STRING, FLOAT, INT64 = dtypes.DT_STRING, dtypes.DT_FLOAT, dtypes.DT_INT64
SIGNATURES: dict[str, tuple[dict[str, tuple[int, tuple[int, ...]]], dict[str, tuple]]] = {
    "serving_default": (
        {"text": (STRING, (-1,)), "x": (FLOAT, (-1, 2))},
        {"text_bytes": (STRING, (-1,)), "upper": (STRING, (-1,)), "x2": (FLOAT, (-1, 2)),
         "count": (INT64, (-1,))},
    ),
    "lengths": ({"text": (STRING, (-1,))}, {"count": (INT64, (-1,))}),
    "types": (
        {name: (dtype, (-1,)) for name, dtype in
         {"b": dtypes.DT_BOOL, "i": dtypes.DT_INT32, "u": dtypes.DT_UINT64,
          "d": dtypes.DT_DOUBLE}.items()},
        {name: (dtype, (-1,)) for name, dtype in
         {"b": dtypes.DT_BOOL, "i": dtypes.DT_INT32, "u": dtypes.DT_UINT64,
          "d": dtypes.DT_DOUBLE}.items()},
    ),
}


class FakeError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _spec(signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=MODEL, signature_name=signature)
    spec.version.value = VERSION
    return spec


def _check_model(spec: model_pb2.ModelSpec) -> None:
    if spec.name != MODEL or (spec.HasField("version") and spec.version.value != VERSION):
        raise FakeError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: "
                                                   f"Latest({spec.name})")


def signature_map() -> get_model_metadata_pb2.SignatureDefMap:
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, (inputs, outputs) in SIGNATURES.items():
        sig = result.signature_def[name]
        sig.method_name = "tensorflow/serving/predict"
        for side, specs in ((sig.inputs, inputs), (sig.outputs, outputs)):
            for alias, (dtype, shape) in specs.items():
                info = signature_pb2.TensorInfo(name=f"{alias}:0", dtype=dtype)
                for size in shape:
                    info.tensor_shape.dim.add(size=size)
                side[alias].CopyFrom(info)
    return result


def predict(data: bytes) -> bytes:
    call = core.decode_predict_request(data)
    spec = model_pb2.ModelSpec(name=call.model_name)
    if call.version is not None:
        spec.version.value = call.version
    _check_model(spec)
    name = call.signature_name or "serving_default"
    if name not in SIGNATURES:
        raise FakeError(grpc.StatusCode.FAILED_PRECONDITION,
                        f'Serving signature key "{name}" not found.')
    inputs, _ = SIGNATURES[name]
    if set(call.inputs) != set(inputs):
        raise FakeError(grpc.StatusCode.INVALID_ARGUMENT, f"wrong inputs {sorted(call.inputs)}")
    arrays = {n: dtypes.to_numpy(t.dtype, t.shape, t.data) for n, t in call.inputs.items()}
    out: dict[str, np.ndarray] = {}
    if name == "types":
        out = dict(arrays)
    else:
        text = arrays["text"]
        out["count"] = np.array([len(s) for s in text.ravel()], dtype=np.int64)
        if name == "serving_default":
            out["text_bytes"] = text
            out["upper"] = np.array([s.upper() for s in text.ravel()], dtype=object)
            out["x2"] = arrays["x"] * np.float32(2)
    encoded = {}
    for alias, array in out.items():
        dtype = _dtype_of(name, alias)
        if dtype == STRING:
            payload: bytes | list[bytes] = list(array.ravel())
        else:
            payload = np.ascontiguousarray(array, dtype=dtypes.NUMPY_DTYPES[dtype]).tobytes()
        encoded[alias] = core.encode_tensor(dtype, array.shape, payload, True)
    return core.encode_predict_response(encoded, _spec(name).SerializeToString())


def _dtype_of(signature: str, alias: str) -> int:
    return SIGNATURES[signature][1][alias][0]


def metadata(data: bytes) -> bytes:
    request = get_model_metadata_pb2.GetModelMetadataRequest.FromString(data)
    _check_model(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=_spec())
    response.metadata["signature_def"].Pack(signature_map())
    return response.SerializeToString()


def status(data: bytes) -> bytes:
    request = get_model_status_pb2.GetModelStatusRequest.FromString(data)
    _check_model(request.model_spec)
    response = get_model_status_pb2.GetModelStatusResponse()
    response.model_version_status.add(
        version=VERSION, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
    )
    return response.SerializeToString()


def _examples(request) -> tuple[list, object | None]:
    which = request.input.WhichOneof("kind")
    if which == "example_list_with_context":
        holder = request.input.example_list_with_context
        return list(holder.examples), holder.context
    return list(request.input.example_list.examples), None


def _float_feature(example, name: str, default: float = 0.0) -> float:
    feature = example.features.feature.get(name)
    if feature is None or not feature.float_list.value:
        return default
    return feature.float_list.value[0]


def classify(data: bytes) -> bytes:
    request = inference_pb2.ClassificationRequest.FromString(data)
    _check_model(request.model_spec)
    examples, _ = _examples(request)
    response = inference_pb2.ClassificationResponse(model_spec=_spec())
    for index, example in enumerate(examples):
        classes = response.result.classifications.add()
        classes.classes.add(label=f"ex{index}", score=_float_feature(example, "p"))
    return response.SerializeToString()


def regress(data: bytes) -> bytes:
    request = inference_pb2.RegressionRequest.FromString(data)
    _check_model(request.model_spec)
    examples, context = _examples(request)
    bias = _float_feature(context, "bias") if context is not None else 0.0
    response = inference_pb2.RegressionResponse(model_spec=_spec())
    for example in examples:
        response.result.regressions.add(value=_float_feature(example, "x") + bias)
    return response.SerializeToString()


def _handler(func):
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return func(request)
        except FakeError as err:
            context.abort(err.code, err.message)
        except core.CodecError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)

    return grpc.unary_unary_rpc_method_handler(handle)


class FakeReplica:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
                "Predict": _handler(predict),
                "GetModelMetadata": _handler(metadata),
                "Classify": _handler(classify),
                "Regress": _handler(regress),
            }),
            grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
                "GetModelStatus": _handler(status),
            }),
        ])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeReplica:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)
