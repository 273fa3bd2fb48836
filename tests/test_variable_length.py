"""Variable-length batching and allowed batch sizes end to end, with sizes and lengths drawn
by hypothesis: every caller's answer through the proxy equals the replica's answer to that
call sent alone, for gRPC and REST callers sharing batches, with both cores. Real processes
on loopback: one sequence-model replica (refusing batch sizes other than 4, 8, 16) and one
proxy per core, reused by every example."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_client import batch_rows_histogram, stub, to_array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import start_replica
from proxy_procs import start_proxy

from batchproxy.protos import predict_pb2, tensor_pb2

CORES = {"cython": {}, "python": {"BATCHPROXY_NO_EXTENSIONS": "1"}}
OUTPUTS = ("embedding", "token_scores")


@pytest.fixture(scope="module", params=list(CORES))
def sequence_fleet(request):
    replica = start_replica("sequence", batch_cost_ms=5, allowed_batch_sizes="4,8,16")
    proxy = start_proxy([replica], env=CORES[request.param], max_batch_size=16,
                        batch_timeout_micros=4000, allowed_batch_sizes="4,8,16",
                        variable_length_inputs="tokens:0", length_buckets="8,16,32",
                        length_following_outputs="token_scores:1=tokens")
    yield proxy, replica
    proxy.stop()
    replica.stop()


def tokens_request(tokens: np.ndarray, typed: bool) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "sequence"
    proto = tensor_pb2.TensorProto(dtype=tensor_pb2.DT_INT32)
    for size in tokens.shape:
        proto.tensor_shape.dim.add(size=size)
    if typed:
        proto.int_val.extend(tokens.ravel().tolist())
    else:
        proto.tensor_content = tokens.astype("<i4").tobytes()
    request.inputs["tokens"].CopyFrom(proto)
    return request


def row_tokens(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Token ids 1..1023 with each row's own tail of pad ids (0), as a tokenizer pads."""
    tokens = rng.integers(1, 1024, size=(rows, length), dtype=np.int32)
    for row in range(rows):
        tokens[row, int(rng.integers(1, length + 1)):] = 0
    return tokens


async def alone(replica_address: str, calls: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each call's answer from the replica itself, sent alone (padded to an allowed size by
    hand with a copy of its last row, which the replica's rows never mix)."""
    answers = []
    async with grpc.aio.insecure_channel(replica_address) as channel:
        client = stub(channel)
        for tokens in calls:
            size = next(s for s in (4, 8, 16) if s >= len(tokens))
            padded = np.concatenate([tokens, np.repeat(tokens[-1:], size - len(tokens), 0)])
            response = await client.Predict(tokens_request(padded, False), timeout=30)
            answers.append({name: to_array(response.outputs[name])[:len(tokens)]
                            for name in OUTPUTS})
    return answers


async def through_proxy(proxy, calls: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    async with grpc.aio.insecure_channel(proxy.address) as channel, \
            aiohttp.ClientSession() as session:
        client = stub(channel)

        async def call(i: int, tokens: np.ndarray) -> dict[str, np.ndarray]:
            if i % 2 == 0:
                response = await client.Predict(tokens_request(tokens, i % 4 == 0), timeout=30)
                return {name: to_array(response.outputs[name]) for name in OUTPUTS}
            url = f"{proxy.rest_url}/v1/models/sequence:predict"
            body = {"inputs": {"tokens": tokens.tolist()}}
            async with session.post(url, json=body,
                                    timeout=aiohttp.ClientTimeout(total=30)) as reply:
                assert reply.status == 200, await reply.text()
                outputs = (await reply.json())["outputs"]
            return {name: np.array(outputs[name], np.float32) for name in OUTPUTS}

        return await asyncio.gather(*(call(i, t) for i, t in enumerate(calls)))


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 40)), min_size=2,
                       max_size=10),
       seed=st.integers(0, 2**16))
def test_every_answer_equals_the_call_sent_alone(sequence_fleet, shapes, seed):
    proxy, replica = sequence_fleet
    rng = np.random.default_rng(seed)
    calls = [row_tokens(rng, rows, length) for rows, length in shapes]
    want = asyncio.run(alone(replica.address, calls))
    got = asyncio.run(through_proxy(proxy, calls))
    for tokens, mine, theirs in zip(calls, got, want, strict=True):
        assert mine["token_scores"].shape == tokens.shape  # cut back to its own length
        for name in OUTPUTS:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=1e-6)


def test_calls_of_different_lengths_share_batches(sequence_fleet):
    proxy, replica = sequence_fleet
    rng = np.random.default_rng(3)
    calls = [row_tokens(rng, 1, length) for length in range(9, 17) for _ in range(4)]
    before = batch_rows_histogram(replica.rest_url).get("count", 0)
    asyncio.run(through_proxy(proxy, calls))
    batches = batch_rows_histogram(replica.rest_url)["count"] - before
    # 32 calls of 8 different lengths in one bucket: fewer batches than lengths would need
    # if each length batched alone is not assured on a busy machine; fewer than calls is.
    assert batches < len(calls) * 0.8, f"{batches} batches for {len(calls)} calls"
