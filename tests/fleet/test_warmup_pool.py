"""Warm-up in one process, against a stub replica transport: TFS warm-up records parsed,
templates built from a signature or a record and sized to each batch size, and the pool
holding a joining replica (and a new version on a healthy one) until it is warmed."""

from __future__ import annotations

import asyncio
import inspect
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ModelState, ReplicaPool, ReplicaState
from batchproxy.fleet.warmup import (
    WarmingPool,
    WarmupConfig,
    WarmupFileError,
    read_warmup_requests,
    signature_template,
    warmup_request,
)
from batchproxy.methods import GET_MODEL_METADATA, PREDICT
from batchproxy.protos import get_model_metadata_pb2, predict_pb2, signature_pb2

MODEL = "m"


def tfrecord(data: bytes) -> bytes:
    # CRCs are zeros: the reader does not check them.
    return struct.pack("<Q", len(data)) + b"\0" * 4 + data + b"\0" * 4


def length_delimited(number: int, data: bytes) -> bytes:
    key, length, out = (number << 3) | 2, len(data), bytearray()
    out.append(key)
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + data


def prediction_log(request: predict_pb2.PredictRequest) -> bytes:
    """PredictionLog{predict_log=6: PredictLog{request=1}}, as TFS's warm-up files hold."""
    return length_delimited(6, length_delimited(1, request.SerializeToString()))


def float_request(array: np.ndarray, name: str = MODEL) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    tensor = request.inputs["x"]
    tensor.dtype = dtypes.DT_FLOAT
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = array.astype(np.float32).tobytes()
    return request


def metadata(inputs: dict[str, tuple[int, list[int]]]) -> bytes:
    signature = signature_pb2.SignatureDef()
    for alias, (dtype, dims) in inputs.items():
        info = signature.inputs[alias]
        info.dtype = dtype  # type: ignore[assignment]
        for size in dims:
            info.tensor_shape.dim.add(size=size)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signatures.signature_def["serving_default"].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].Pack(signatures)
    return response.SerializeToString()


def test_warmup_records_become_templates_per_model(tmp_path: Path) -> None:
    path = tmp_path / "tf_serving_warmup_requests"
    classify_log = length_delimited(2, b"")  # skipped: not a predict_log
    path.write_bytes(tfrecord(prediction_log(float_request(np.arange(6.0).reshape(3, 2))))
                     + tfrecord(classify_log)
                     + tfrecord(prediction_log(float_request(np.ones((1, 2)), "other"))))
    templates = read_warmup_requests(path)
    assert sorted(templates) == [MODEL, "other"]
    signature, arrays = templates[MODEL][0]
    assert signature == "serving_default"
    np.testing.assert_array_equal(arrays["x"], np.arange(6.0).reshape(3, 2))

    # Rows repeated, then cut, to each batch size.
    call = codec.decode_predict_request(warmup_request(MODEL, 7, templates[MODEL][0], 5))
    assert (call.model_name, call.version, call.rows) == (MODEL, 7, 5)
    x = dtypes.to_numpy(call.inputs["x"].dtype, call.inputs["x"].shape, call.inputs["x"].data)
    np.testing.assert_array_equal(x[:, 0], [0, 2, 4, 0, 2])


def test_a_cut_or_empty_warmup_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(tfrecord(prediction_log(float_request(np.ones((1, 2)))))[:-6])
    with pytest.raises(WarmupFileError, match="ends first"):
        read_warmup_requests(path)
    path.write_bytes(b"")
    with pytest.raises(WarmupFileError, match="no predict_log"):
        read_warmup_requests(path)
    with pytest.raises(WarmupFileError, match="missing"):
        read_warmup_requests(tmp_path / "missing")


def test_signature_template_is_zeros_with_unknown_dims_one() -> None:
    signature, arrays = signature_template(metadata({
        "images": (dtypes.DT_FLOAT, [-1, 28, -1]), "ids": (dtypes.DT_STRING, [-1])}))
    assert signature == "serving_default"
    assert arrays["images"].shape == (1, 28, 1) and not arrays["images"].any()
    assert arrays["ids"].shape == (1,) and arrays["ids"][0] == b""
    call = codec.decode_predict_request(warmup_request(MODEL, None, (signature, arrays), 3))
    assert call.rows == 3 and call.version is None
    assert call.inputs["ids"].dtype == dtypes.DT_STRING


class StubTransport:
    """A replica that answers metadata at once and each Predict when the test lets it."""

    def __init__(self) -> None:
        self.predicts: list[predict_pb2.PredictRequest] = []
        self.release = asyncio.Event()
        self.error: ProxyError | None = None

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == GET_MODEL_METADATA:
            return metadata({"x": (dtypes.DT_FLOAT, [-1, 4])})
        assert path == PREDICT
        self.predicts.append(predict_pb2.PredictRequest.FromString(request))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return b""

    async def close(self) -> None:
        pass


def pool_with_stub(batch: int = 4, max_inflight: int = 4
                   ) -> tuple[WarmingPool, StubTransport, list[tuple[str, str]]]:
    stub = StubTransport()
    counted: list[tuple[str, str]] = []
    pool = WarmingPool(["r:1"], max_inflight, transports=lambda address: stub,
                       warmup=WarmupConfig(max_batch_size=batch),
                       count=lambda model, outcome: counted.append((model, outcome)))
    return pool, stub, counted


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_warm_up_calls_keep_to_the_replica_limit() -> None:
    # A replica allowed one batch at a time gets its warm-up calls one at a time too.
    pool, stub, _ = pool_with_stub(max_inflight=1)
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    assert len(stub.predicts) == 1 and replica.outstanding == 1
    stub.release.set()
    for _ in range(10):
        await settle()
    assert len(stub.predicts) == 4
    assert replica.outstanding == 0 and replica.state is ReplicaState.HEALTHY


async def test_a_joining_replica_stays_out_until_warmed() -> None:
    pool, stub, counted = pool_with_stub()
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    assert replica.state is ReplicaState.JOINING
    assert pool.try_acquire(MODEL) is None
    assert sorted(len(p.inputs["x"].tensor_shape.dim) and p.inputs["x"].tensor_shape.dim[0].size
                  for p in stub.predicts) == [1, 2, 3, 4]
    # Checks that come meanwhile wait too; no second warm-up starts.
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    assert len(stub.predicts) == 4 and replica.state is ReplicaState.JOINING
    stub.release.set()
    await settle()
    assert replica.state is ReplicaState.HEALTHY
    assert counted == [(MODEL, "ok")] * 4
    assert pool.try_acquire(MODEL) is replica
    # Warmed once: the next check passes straight through.
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    assert len(stub.predicts) == 4
    await pool.close()


async def test_a_replica_that_goes_down_while_warming_is_warmed_again() -> None:
    pool, stub, counted = pool_with_stub(batch=2)
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    stub.error = ProxyError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    stub.release.set()
    await settle()
    assert replica.state is ReplicaState.JOINING and not pool.warmed
    stub.error = None
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    assert replica.state is ReplicaState.HEALTHY
    assert counted.count((MODEL, "ok")) == 2
    await pool.close()


async def test_a_failed_check_while_warming_is_not_undone_by_the_warmup() -> None:
    pool, stub, _ = pool_with_stub(batch=2)
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    pool.record_check(replica, False, "refused")
    assert replica.state is ReplicaState.EJECTED
    replica.ejected_until = 0.0  # its back-off over: only a passing check may bring it back
    stub.release.set()
    await settle()
    assert replica.state is ReplicaState.EJECTED
    await pool.close()


async def test_a_warmup_the_model_refuses_does_not_keep_the_replica_out() -> None:
    pool, stub, counted = pool_with_stub(batch=2)
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    stub.error = ProxyError(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    stub.release.set()
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    await settle()
    assert replica.state is ReplicaState.HEALTHY
    assert (MODEL, "failed") in counted
    await pool.close()


async def test_without_warmup_the_pool_is_plain() -> None:
    stub = StubTransport()
    pool = WarmingPool(["r:1"], transports=lambda address: stub,
                       warmup=WarmupConfig(enabled=False))
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    assert replica.state is ReplicaState.HEALTHY and not stub.predicts
    await pool.close()


@pytest.mark.skipif("versions" not in inspect.signature(ReplicaPool.record_check).parameters,
                    reason="health checks do not list versions here")
async def test_a_new_version_on_a_healthy_replica_reads_loading_until_warmed() -> None:
    pool, stub, _ = pool_with_stub(batch=2)
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    stub.release.set()
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE},
                      versions={MODEL: {1: 30}})
    await settle()
    assert replica.state is ReplicaState.HEALTHY
    stub.release.clear()
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE},
                      versions={MODEL: {1: 30, 2: 30}})
    await settle()
    assert replica.versions[MODEL] == {1: 30, 2: 20}  # type: ignore[attr-defined]
    assert {p.model_spec.version.value for p in stub.predicts[-2:]} == {2}
    stub.release.set()
    await settle()
    assert replica.versions[MODEL] == {1: 30, 2: 30}  # type: ignore[attr-defined]
    await pool.close()


async def test_warm_up_sends_each_models_own_batch_sizes() -> None:
    # A model with allowed sizes is warmed only at those (the proxy pads every batch to
    # one); the sizes come from the model's own settings, not the flags' max_batch_size.
    stub = StubTransport()
    stub.release.set()
    sizes = {MODEL: (2, 4, 8)}
    pool = WarmingPool(["r:1"], 8, transports=lambda address: stub,
                       warmup=WarmupConfig(max_batch_size=32,
                                           sizes_of=lambda model: sizes[model]))
    pool.note_model(MODEL)
    replica = pool.replicas["r:1"]
    pool.record_check(replica, True, "ok", {MODEL: ModelState.AVAILABLE})
    for _ in range(5):
        await settle()
    assert sorted(p.inputs["x"].tensor_shape.dim[0].size for p in stub.predicts) == [2, 4, 8]
    assert replica.state is ReplicaState.HEALTHY
    await pool.close()
