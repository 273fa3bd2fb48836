"""Per-model batching settings end to end, as real processes: one proxy whose flags batch
fixed-shape calls of any size up to 16, and whose proxy config file gives the `sequence`
model its own allowed sizes (4, 8: its replica, like a compiled model, refuses any other)
and variable-length batching. The replica of `identity`, next to it, keeps the flags'
settings: its batches are never padded. Warm-up sends `sequence` only its own sizes, and
a reload (HandleReloadConfigRequest re-reads the file) changes a model's batching for the
calls after it, while a bad file is refused and the settings in force stay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_client import batch_rows_histogram, predict_request, stub, to_array
from procs import Process, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.protos import predict_pb2, services_pb2, services_pb2_grpc, tensor_pb2

SIZES = (4, 8)
OUTPUTS = ("embedding", "token_scores")
PROXY_FILE = """[models.sequence.batching]
allowed_batch_sizes = [4, 8]
batch_timeout_micros = 4000
variable_length_inputs = { tokens = 0 }
length_following_outputs = { token_scores = "1=tokens" }
"""


def samples(url: str, family_name: str) -> list[tuple[str, dict[str, str], float]]:
    text = requests.get(f"{url}/monitoring/prometheus/metrics", timeout=5).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            if family.name == family_name for s in family.samples]


def refused_predicts(replica: Process) -> float:
    return sum(value for name, labels, value in samples(replica.rest_url,
                                                        "batchproxy_replica_requests")
               if name.endswith("_total") and labels["method"] == "Predict"
               and labels["code"] == "INVALID_ARGUMENT")


def warmed(proxy: Process, model: str) -> float:
    return sum(value for name, labels, value in samples(proxy.rest_url,
                                                        "batchproxy_warmup_calls")
               if name.endswith("_total") and labels["model"] == model
               and labels["outcome"] == "ok")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Process, Process, Process, Path]]:
    config = Path(tmp_path_factory.mktemp("batching")) / "proxy.toml"
    config.write_text(PROXY_FILE)
    with start_replica("sequence", batch_cost_ms=5, allowed_batch_sizes="4,8") as seq, \
            start_replica("identity", batch_cost_ms=5) as ident, \
            start_proxy([seq, ident], max_batch_size=16, batch_timeout_micros=4000,
                        proxy_config_file=config, health_interval_ms=200) as proxy:
        deadline = time.monotonic() + 30
        while warmed(proxy, "sequence") < len(SIZES) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield proxy, seq, ident, config


def tokens_request(tokens: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "sequence"
    proto = tensor_pb2.TensorProto(dtype=tensor_pb2.DT_INT32)
    for size in tokens.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = tokens.astype("<i4").tobytes()
    request.inputs["tokens"].CopyFrom(proto)
    return request


def token_calls(seed: int, count: int) -> list[np.ndarray]:
    """Calls of 1..3 rows and lengths 1..20, each row with its own tail of pad ids (0)."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(count):
        rows, length = int(rng.integers(1, 4)), int(rng.integers(1, 21))
        tokens = rng.integers(1, 1024, size=(rows, length), dtype=np.int32)
        for row in range(rows):
            tokens[row, int(rng.integers(1, length + 1)):] = 0
        calls.append(tokens)
    return calls


async def alone(address: str, calls: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each call's answer from the replica itself, padded by hand to an allowed size with
    copies of its last row (rows never mix in the model)."""
    answers = []
    async with grpc.aio.insecure_channel(address) as channel:
        client = stub(channel)
        for tokens in calls:
            size = next(s for s in SIZES if s >= len(tokens))
            padded = np.concatenate([tokens, np.repeat(tokens[-1:], size - len(tokens), 0)])
            response = await client.Predict(tokens_request(padded), timeout=30)
            answers.append({name: to_array(response.outputs[name])[:len(tokens)]
                            for name in OUTPUTS})
    return answers


async def mixed_traffic(proxy: Process, calls: list[np.ndarray], fixed: list[np.ndarray]
                        ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        client = stub(channel)

        async def sequence(tokens: np.ndarray) -> dict[str, np.ndarray]:
            response = await client.Predict(tokens_request(tokens), timeout=30)
            return {name: to_array(response.outputs[name]) for name in OUTPUTS}

        async def identity(x: np.ndarray) -> np.ndarray:
            response = await client.Predict(predict_request("identity", {"x": x}), timeout=30)
            return to_array(response.outputs["y"])

        answers = await asyncio.gather(*(sequence(t) for t in calls),
                                       *(identity(x) for x in fixed))
    return list(answers[:len(calls)]), list(answers[len(calls):])  # type: ignore[arg-type]


def test_each_model_is_batched_by_its_own_settings(fleet) -> None:
    proxy, seq, ident, _ = fleet
    assert warmed(proxy, "sequence") == len(SIZES)  # warmed at 4 and 8 only
    shown = requests.get(f"{proxy.rest_url}/v1/batchproxy/models", timeout=10).json()
    assert shown["sequence"]["batching"]["allowed_batch_sizes"] == [4, 8]
    assert shown["sequence"]["batching"]["max_batch_size"] == 8
    assert shown["sequence"]["batching"]["variable_length_inputs"] == {"tokens": 0.0}
    assert refused_predicts(seq) == 0
    calls = token_calls(13, 40)
    rng = np.random.default_rng(14)
    fixed = [rng.random((int(rng.integers(1, 6)), 3), np.float32) for _ in range(40)]
    want = asyncio.run(alone(seq.address, calls))
    seq_before = batch_rows_histogram(seq.rest_url)
    ident_before = batch_rows_histogram(ident.rest_url)
    got, echoed = asyncio.run(mixed_traffic(proxy, calls, fixed))
    for tokens, mine, theirs in zip(calls, got, want, strict=True):
        assert mine["token_scores"].shape == tokens.shape  # cut back to its own length
        for name in OUTPUTS:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=1e-6)
    for x, y in zip(fixed, echoed, strict=True):
        np.testing.assert_array_equal(x, y)
    # The compiled replica never saw a size it refuses; its batches of calls of different
    # lengths were shared and padded to 4 or 8 rows.
    assert refused_predicts(seq) == 0
    seq_after = batch_rows_histogram(seq.rest_url)
    batches = seq_after["count"] - seq_before["count"]
    rows = seq_after["sum"] - seq_before["sum"]
    assert rows % 4 == 0 and rows >= sum(len(t) for t in calls)
    assert batches < len(calls), f"{batches} batches for {len(calls)} calls"
    # identity keeps the flags: no allowed sizes, so no padding row.
    ident_after = batch_rows_histogram(ident.rest_url)
    assert ident_after["sum"] - ident_before["sum"] == sum(len(x) for x in fixed)


def reload(proxy: Process) -> grpc.StatusCode:
    """HandleReloadConfigRequest with no config of its own: both files are read again."""
    with grpc.insecure_channel(proxy.address) as channel:
        try:
            services_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                services_pb2.ReloadConfigRequest(), timeout=30)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def identity_batches(proxy: Process, ident: Process, calls: int) -> tuple[float, float]:
    """(batches, rows) the identity replica got for `calls` one-row calls sent at once."""
    before = batch_rows_histogram(ident.rest_url)
    rng = np.random.default_rng(calls)
    fixed = [rng.random((1, 3), np.float32) for _ in range(calls)]
    _, echoed = asyncio.run(mixed_traffic(proxy, [], fixed))
    for x, y in zip(fixed, echoed, strict=True):
        np.testing.assert_array_equal(x, y)
    after = batch_rows_histogram(ident.rest_url)
    return after["count"] - before["count"], after["sum"] - before["sum"]


def test_a_reload_changes_a_models_batching_and_a_bad_one_is_refused(fleet) -> None:
    proxy, _, ident, config = fleet
    # identity gets batches of one row at most: every call is a batch of its own.
    config.write_text(PROXY_FILE + "\n[models.identity]\nbatching = { max_batch_size = 1 }\n")
    assert reload(proxy) is grpc.StatusCode.OK
    assert identity_batches(proxy, ident, 24) == (24, 24)
    # Allowed sizes that break TFS's rule: refused, and batches of one row stay.
    config.write_text(PROXY_FILE + "\n[models.identity.batching]\nmax_batch_size = 4\n"
                      "allowed_batch_sizes = [2, 3]\n")
    assert reload(proxy) is grpc.StatusCode.INVALID_ARGUMENT
    assert identity_batches(proxy, ident, 12) == (12, 12)
    # Allowed sizes 2 and 4: each batch is padded to one of them.
    config.write_text(PROXY_FILE + "\n[models.identity]\n"
                      "batching = { allowed_batch_sizes = [2, 4] }\n")
    assert reload(proxy) is grpc.StatusCode.OK
    batches, rows = identity_batches(proxy, ident, 9)
    assert rows % 2 == 0 and rows >= 9 and rows <= 4 * batches
