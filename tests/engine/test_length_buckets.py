"""Variable-length batching in virtual time: which calls share a batch, how they are padded,
and how length-following outputs come back. The replica echoes its input `tokens` as
`scores` (follows the length) and `raw` (returned as computed), 100 ms a batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from scripted import make_pool

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2, predict_pb2, tensor_pb2


@dataclass
class EchoReplica:
    sent: list[tuple[float, np.ndarray]] = field(default_factory=list)

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == GET_MODEL_STATUS:
            status = get_model_status_pb2.GetModelStatusResponse()
            status.model_version_status.add(
                version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
            return status.SerializeToString()
        assert path == PREDICT
        call = codec.decode_predict_request(request)
        tokens = call.inputs["tokens"]
        self.sent.append((asyncio.get_running_loop().time(),
                          np.frombuffer(tokens.data, "<i4").reshape(tokens.shape)))
        await asyncio.sleep(0.1)
        out = codec.encode_tensor(tokens.dtype, tokens.shape, tokens.data, True)
        return codec.encode_predict_response({"scores": out, "raw": out}, call.model_spec)

    async def close(self) -> None:
        pass


def tokens_call(tokens: list[list[int]]) -> codec.PredictCall:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    proto = tensor_pb2.TensorProto(dtype=tensor_pb2.DT_INT32)
    proto.tensor_shape.dim.add(size=len(tokens))
    proto.tensor_shape.dim.add(size=len(tokens[0]))
    proto.int_val.extend(v for row in tokens for v in row)
    request.inputs["tokens"].CopyFrom(proto)
    return codec.decode_predict_request(request.SerializeToString())


def outputs(response: bytes) -> dict[str, list[list[int]]]:
    message = predict_pb2.PredictResponse.FromString(response)
    result = {}
    for name, proto in message.outputs.items():
        shape = [d.size for d in proto.tensor_shape.dim]
        result[name] = np.array(proto.int_val, np.int32).reshape(shape).tolist()
    return result


def run(vrun, calls: list[list[list[int]]], **batching):
    replica = EchoReplica()

    async def main():
        # The fixed rule: the calls gather for the batch timeout, so which share a batch
        # is exact (the adaptive policy sends the first one alone to the idle replica).
        config = BatchingConfig(max_batch_size=8, batch_timeout_micros=2000,
                                max_enqueued_rows=64, policy="fixed", **batching)
        engine = Engine(config, make_pool({"a": replica}))
        engine.start()
        answers = await asyncio.gather(*(engine.submit(tokens_call(c)) for c in calls))
        await engine.close()
        return answers

    answers = vrun(main())
    return [outputs(a) for a in answers], [(round(at, 6), t.tolist()) for at, t in replica.sent]


def test_without_the_option_each_length_batches_alone(vrun):
    _, sent = run(vrun, [[[1, 2]], [[3, 4, 5]]])
    assert sorted(len(tokens[0]) for _, tokens in sent) == [2, 3]


def test_lengths_share_a_batch_padded_with_the_pad_value_and_cut_back(vrun):
    answers, sent = run(vrun, [[[1, 2]], [[3, 4, 5]], [[6]]],
                        variable_length_inputs=(("tokens", 7.0),),
                        length_following_outputs=(("scores", 1, "tokens"),))
    # One batch, padded to the longest (3) with 7, never with a first element.
    assert sent == [(0.002, [[1, 2, 7], [3, 4, 5], [6, 7, 7]])]
    assert [a["scores"] for a in answers] == [[[1, 2]], [[3, 4, 5]], [[6]]]
    # An output not said to follow the length comes back as the model computed it.
    assert answers[0]["raw"] == [[1, 2, 7]]


def test_buckets_keep_a_short_call_out_of_a_long_batch(vrun):
    short, long_ = [[1] * 40], [[2] * 200]
    _, sent = run(vrun, [short, [[3] * 50], long_],
                  variable_length_inputs=(("tokens", 0.0),), length_buckets=(32, 64, 256))
    lengths = sorted(len(tokens[0]) for _, tokens in sent)
    # 40 and 50 share the bucket up to 64 (padded to 50, the longest, not to 64); 200 is
    # alone in the bucket up to 256, so the call of length 40 never pads to 200 or 256.
    assert lengths == [50, 200]
    assert all(len(tokens) == 1 for _, tokens in sent if len(tokens[0]) == 200)


def test_lengths_and_allowed_sizes_together(vrun):
    answers, sent = run(vrun, [[[1, 2], [3, 4]], [[5]]],
                        variable_length_inputs=(("tokens", 0.0),),
                        allowed_batch_sizes=(4, 8),
                        length_following_outputs=(("scores", 1, "tokens"),))
    # Three real rows padded to 4 with a copy of the last, after the lengths were evened.
    assert sent == [(0.002, [[1, 2], [3, 4], [5, 0], [5, 0]])]
    assert [a["scores"] for a in answers] == [[[1, 2], [3, 4]], [[5]]]
