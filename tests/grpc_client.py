"""A real gRPC client for tests: our generated TFS messages over grpc.aio."""

from __future__ import annotations

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    services_pb2_grpc,
    tensor_pb2,
)

FLOAT = tensor_pb2.DT_FLOAT


def float_tensor(array: np.ndarray, typed: bool = False) -> tensor_pb2.TensorProto:
    """A DT_FLOAT TensorProto in tensor_content form (what tf.make_tensor_proto sends) or in
    typed float_val form (what Java and Go clients send)."""
    array = np.asarray(array, dtype=np.float32)
    proto = tensor_pb2.TensorProto(dtype=FLOAT)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if typed:
        proto.float_val.extend(array.ravel().tolist())
    else:
        proto.tensor_content = array.tobytes()
    return proto


def to_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=np.float32).reshape(shape)
    values = np.asarray(proto.float_val, dtype=np.float32)
    if values.size == 1 and int(np.prod(shape)) != 1:
        values = np.full(int(np.prod(shape)), values[0], dtype=np.float32)
    return values.reshape(shape)


def predict_request(
    model: str,
    inputs: dict[str, np.ndarray],
    *,
    typed: bool = False,
    signature: str = "serving_default",
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(float_tensor(array, typed))
    return request


def stub(channel) -> services_pb2_grpc.PredictionServiceStub:
    return services_pb2_grpc.PredictionServiceStub(channel)


def metadata_request(model: str) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    return request


def status_request(model: str) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    return request


def batch_rows_histogram(rest_url: str) -> dict[str, float]:
    """The replica's batchproxy_replica_batch_rows histogram: {"count", "sum", "le=<b>"...}."""
    text = requests.get(f"{rest_url}/monitoring/prometheus/metrics", timeout=5).text
    result: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "batchproxy_replica_batch_rows":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                result["count"] = sample.value
            elif sample.name.endswith("_sum"):
                result["sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                result[f"le={float(sample.labels['le']):g}"] = sample.value
    return result
