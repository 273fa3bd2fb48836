"""Request bodies, serialized once before the load starts, and the echo server's canned
answers. The generator sends the same bytes every time: building a message per call would
cost the generator more than the proxy spends on it."""

from __future__ import annotations

import numpy as np
import orjson

from batchproxy.protos import predict_pb2, tensor_pb2

PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
DT_FLOAT = tensor_pb2.DT_FLOAT


def rows_array(rows: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """Distinct, exactly representable float32 values (k / 8), so a REST body round-trips."""
    count = rows * int(np.prod(row_shape, dtype=np.int64))
    return (np.arange(count, dtype=np.float32) / 8).reshape((rows, *row_shape))


def grpc_predict_body(model: str, input_name: str, rows: int, row_shape: tuple[int, ...],
                      *, signature: str = "serving_default", typed: bool = False) -> bytes:
    """A serialized PredictRequest: tensor_content as tf.make_tensor_proto sends it, or
    typed float_val as Java and Go clients do (`typed`)."""
    array = rows_array(rows, row_shape)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    tensor = request.inputs[input_name]
    tensor.dtype = DT_FLOAT
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    if typed:
        tensor.float_val.extend(array.ravel().tolist())
    else:
        tensor.tensor_content = array.astype("<f4").tobytes()
    return request.SerializeToString()


def rest_predict_path(model: str) -> str:
    return f"/v1/models/{model}:predict"


def rest_predict_body(rows: int, row_shape: tuple[int, ...], *,
                      signature: str = "serving_default") -> bytes:
    """TFS's row format, {"signature_name": ..., "instances": [...]}, for a one-input model."""
    array = rows_array(rows, row_shape)
    return orjson.dumps({"signature_name": signature, "instances": array.tolist()})


def canned_predict_response() -> bytes:
    """What the echo server answers to every Predict: a valid one-row PredictResponse."""
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "echo"
    response.model_spec.signature_name = "serving_default"
    response.model_spec.version.value = 1
    output = response.outputs["y"]
    output.dtype = DT_FLOAT
    output.tensor_shape.dim.add(size=1)
    output.tensor_shape.dim.add(size=1)
    output.float_val.append(0.0)
    return response.SerializeToString()


CANNED_JSON = b'{"predictions": [[0.0]]}'
