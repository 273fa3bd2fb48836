"""Cost of the codec on the proxy's hot path, compiled core vs pure-Python twin.

The batch: 64 one-row requests of a [1, 784] float32 input (MNIST-sized, sent as
tensor_content the way tf.make_tensor_proto does), decoded, merged into one request, and the
replica's answer (TFS-style typed float_val outputs, [64, 10] and [64, 784]) cut back into
64 responses. Divide a batch's time by 64 for the cost per request (extra_info has it).

    .venv/bin/pytest benchmarks --benchmark-only
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from batchproxy.protos import predict_pb2, tensor_pb2

BATCH = 64
FEATURES = 784
CLASSES = 10
FLOAT = 1


def tensor(arr: np.ndarray, typed: bool) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto(dtype=FLOAT)
    for d in arr.shape:
        tp.tensor_shape.dim.add(size=d)
    if typed:
        tp.float_val.extend(arr.ravel().tolist())
    else:
        tp.tensor_content = arr.astype("<f4").tobytes()
    return tp


def request(arr: np.ndarray, typed: bool = False) -> bytes:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "mnist"
    req.model_spec.signature_name = "serving_default"
    req.inputs["x"].CopyFrom(tensor(arr, typed))
    return req.SerializeToString()


def response(outputs: dict[str, np.ndarray]) -> bytes:
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = "mnist"
    resp.model_spec.version.value = 1
    resp.model_spec.signature_name = "serving_default"
    for name, arr in outputs.items():
        resp.outputs[name].CopyFrom(tensor(arr, typed=True))
    return resp.SerializeToString()


RNG = np.random.default_rng(0)
REQUESTS = [request(RNG.random((1, FEATURES), dtype=np.float32)) for _ in range(BATCH)]
RESPONSE = response(
    {
        "probabilities": RNG.random((BATCH, CLASSES), dtype=np.float32),
        "reconstruction": RNG.random((BATCH, FEATURES), dtype=np.float32),
    }
)
ROWS = [1] * BATCH


def merge_and_split(core: ModuleType) -> list[bytes]:
    calls = [core.decode_predict_request(r) for r in REQUESTS]
    core.encode_predict_request([(call, 0, call.rows) for call in calls])
    return core.split_predict_response(RESPONSE, ROWS)


@pytest.mark.benchmark(group="batch of 64 x [1,784] f32: decode + merge + split")
def test_merge_split(benchmark, core: ModuleType) -> None:
    parts = benchmark(merge_and_split, core)
    assert len(parts) == BATCH
    benchmark.extra_info["requests_per_batch"] = BATCH
    benchmark.extra_info["per_request_us"] = benchmark.stats.stats.mean / BATCH * 1e6


@pytest.mark.benchmark(group="batch of 64: encode_predict_request only")
def test_merge(benchmark, core: ModuleType) -> None:
    calls = [core.decode_predict_request(r) for r in REQUESTS]
    pieces = [(call, 0, call.rows) for call in calls]
    merged = benchmark(core.encode_predict_request, pieces)
    assert predict_pb2.PredictRequest.FromString(merged).inputs["x"].tensor_shape.dim[0].size == 64


@pytest.mark.benchmark(group="batch of 64: split_predict_response only ([64,10] + [64,784])")
def test_split(benchmark, core: ModuleType) -> None:
    parts = benchmark(core.split_predict_response, RESPONSE, ROWS)
    assert len(parts) == BATCH


@pytest.mark.parametrize("typed", [False, True], ids=["tensor_content", "float_val"])
def test_decode(benchmark, core: ModuleType, typed: bool) -> None:
    benchmark.group = f"decode_predict_request [1,784] f32 {'float_val' if typed else 'content'}"
    data = request(RNG.random((1, FEATURES), dtype=np.float32), typed)
    call = benchmark(core.decode_predict_request, data)
    assert call.rows == 1
