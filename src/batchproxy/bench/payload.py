"""Request bodies, serialized once before the load starts, and the echo server's canned
answers. The generator sends the same bytes every time: building a message per call would
cost the generator more than the proxy spends on it."""

from __future__ import annotations

import numpy as np
import orjson

from batchproxy.codec import dtypes
from batchproxy.protos import predict_pb2, tensor_pb2

PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
DT_FLOAT = tensor_pb2.DT_FLOAT


def rows_array(rows: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """Distinct, exactly representable float32 values (k / 8), so a REST body round-trips."""
    count = rows * int(np.prod(row_shape, dtype=np.int64))
    return (np.arange(count, dtype=np.float32) / 8).reshape((rows, *row_shape))


def typed_rows(dtype: int, rows: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """rows_array's values in `dtype`: small whole numbers for integers, 0/1 for bool, their
    decimal text for strings (what a model that parses numbers would take)."""
    base = rows_array(rows, row_shape)
    if dtype == dtypes.DT_FLOAT:
        return base
    if dtype == dtypes.DT_STRING:
        return np.vectorize(lambda v: str(v).encode(), otypes=[object])(base) \
            if base.size else base.astype(object)
    if dtype == dtypes.DT_BOOL:
        return (np.arange(base.size) % 2 == 1).reshape(base.shape)
    numpy = dtypes.NUMPY_DTYPES.get(dtype)
    if numpy is None:
        raise ValueError(f"the bench cannot build {dtypes.tf_name(dtype)} inputs")
    if numpy.kind in "iu":
        return (np.arange(base.size) % 100).astype(numpy).reshape(base.shape)
    return base.astype(numpy)


def grpc_predict_body(model: str, input_name: str, rows: int, row_shape: tuple[int, ...],
                      *, signature: str = "serving_default", typed: bool = False) -> bytes:
    """A serialized PredictRequest with one float input."""
    return grpc_predict_body_for(model, {input_name: (DT_FLOAT, row_shape)}, rows,
                                 signature=signature, typed=typed)


def grpc_predict_body_for(model: str, inputs: dict[str, tuple[int, tuple[int, ...]]],
                          rows: int, *, signature: str = "serving_default",
                          typed: bool = False) -> bytes:
    """A serialized PredictRequest, `inputs` {name: (dtype, row shape)}: tensor_content as
    tf.make_tensor_proto sends it, or typed fields (float_val, ...) as Java and Go clients do
    (`typed`); strings and bools always travel typed, as TF sends them."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, (dtype, row_shape) in inputs.items():
        array = typed_rows(dtype, rows, row_shape)
        tensor = request.inputs[name]
        tensor.dtype = dtype
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        info = dtypes.BY_VALUE[dtype]
        if dtype == dtypes.DT_STRING:
            tensor.string_val.extend(array.ravel().tolist())
        elif dtype == dtypes.DT_BOOL or (typed and info.field != "half_val"):
            getattr(tensor, info.field).extend(array.ravel().tolist())
        else:
            tensor.tensor_content = array.astype(dtypes.NUMPY_DTYPES[dtype]).tobytes()
    return request.SerializeToString()


def rest_predict_path(model: str) -> str:
    return f"/v1/models/{model}:predict"


def rest_predict_body(rows: int, row_shape: tuple[int, ...], *,
                      signature: str = "serving_default") -> bytes:
    """TFS's row format, {"signature_name": ..., "instances": [...]}, for a one-input model."""
    array = rows_array(rows, row_shape)
    return orjson.dumps({"signature_name": signature, "instances": array.tolist()})


def rest_predict_body_for(inputs: dict[str, tuple[int, tuple[int, ...]]], rows: int, *,
                          signature: str = "serving_default") -> bytes:
    """TFS's row format for `inputs` {name: (dtype, row shape)}: plain rows for one input,
    an object per row keyed by input name for several."""
    columns = {name: _json_values(typed_rows(dtype, rows, shape))
               for name, (dtype, shape) in inputs.items()}
    if len(columns) == 1:
        instances = next(iter(columns.values()))
    else:
        instances = [{name: values[row] for name, values in columns.items()}
                     for row in range(rows)]
    return orjson.dumps({"signature_name": signature, "instances": instances})


def _json_values(array: np.ndarray) -> list:
    if array.dtype == object:
        return np.vectorize(lambda v: v.decode(), otypes=[object])(array).tolist()
    return array.tolist()


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
