"""Shapes in virtual time: variable-length batching with length buckets against today's
batches split by exact length, and the padding policies for allowed batch sizes on two cost
shapes. The real engine (scheduler, policy, dispatcher, codec, slots) runs on the
simulator's virtual clock (batchproxy.sim.clock) against two replicas whose cost is set
here: a sequence model costing a + b x rows x length, and a compiled model costing
a + b x rows for the rows it is sent, padding included. Seeded, exact, the same on any
machine.

    PYTHONPATH=src .venv/bin/python benchmarks/sim/shapes.py [--duration 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchproxy import codec
from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.methods import GET_MODEL_STATUS, PREDICT
from batchproxy.protos import get_model_status_pb2, predict_pb2, tensor_pb2
from batchproxy.sim.clock import run_virtual

WARMUP_S = 1.0


@dataclass
class CostReplica:
    """One batch at a time; a + b x units seconds, units = rows (x length with `tokens`)."""

    a_s: float
    b_s: float
    per_token: bool
    rows_sent: int = 0
    padding_units: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == GET_MODEL_STATUS:
            status = get_model_status_pb2.GetModelStatusResponse()
            status.model_version_status.add(
                version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
            return status.SerializeToString()
        assert path == PREDICT
        call = codec.decode_predict_request(request)
        tensor = call.inputs["x"]
        units = call.rows * (tensor.shape[1] if self.per_token else 1)
        self.rows_sent += call.rows
        async with self._lock:
            await asyncio.sleep(self.a_s + self.b_s * units)
        out = codec.encode_tensor(tensor.dtype, tensor.shape, tensor.data, False)
        return codec.encode_predict_response({"y": out}, call.model_spec)

    async def close(self) -> None:
        pass


def make_call(length: int, dtype: int = tensor_pb2.DT_INT32) -> codec.PredictCall:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.add(size=1)
    proto.tensor_shape.dim.add(size=length)
    proto.tensor_content = np.arange(1, length + 1, dtype="<i4").tobytes()
    request.inputs["x"].CopyFrom(proto)
    return codec.decode_predict_request(request.SerializeToString())


@dataclass
class Run:
    offered: float
    ok_per_s: float
    refused: float  # share of calls refused (queue full) or failed
    p50_ms: float
    p99_ms: float
    pad_per_real: float  # padding units (rows, or tokens) per real unit


async def drive(config: BatchingConfig, replicas: list[CostReplica], rate: float,
                lengths: list[int], duration_s: float, seed: int, per_token: bool) -> Run:
    loop = asyncio.get_running_loop()
    transports = {f"r{i}": r for i, r in enumerate(replicas)}
    pool = ReplicaPool(list(transports), 1, 30.0, transports=lambda a: transports[a], seed=seed)
    for endpoint in pool.replicas.values():
        pool.record_check(endpoint, True)
    engine = Engine(config, pool)
    engine.start()
    rng = random.Random(seed)
    calls = {length: make_call(length) for length in set(lengths)}
    latencies: list[float] = []
    failed = 0
    total = 0
    real_units = 0
    tasks = []

    async def one(call: codec.PredictCall, counted: bool) -> None:
        nonlocal failed
        start = loop.time()
        try:
            await engine.submit(call, timeout=10.0)
        except ProxyError:
            if counted:
                failed += 1
            return
        if counted:
            latencies.append(loop.time() - start)

    begin = loop.time()
    while loop.time() - begin < duration_s + WARMUP_S:
        await asyncio.sleep(rng.expovariate(rate))
        length = rng.choice(lengths)
        counted = loop.time() - begin >= WARMUP_S
        if counted:
            total += 1
            real_units += length if per_token else 1
        tasks.append(asyncio.ensure_future(one(calls[length], counted)))
    await asyncio.gather(*tasks)
    await engine.close()
    registry = engine.metrics.registry
    if per_token:
        pad = sum(r.padding_units for r in replicas)
    else:
        pad = sum(registry.get_sample_value("batchproxy_batch_padding_rows_sum",
                                           {"replica": a}) or 0.0 for a in transports)
        real_units = sum(r.rows_sent for r in replicas) - int(pad)
    latencies.sort()

    def pick(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return Run(rate, len(latencies) / duration_s, failed / max(total, 1), pick(0.5),
               pick(0.99), pad / max(real_units, 1))


class TokenCounter(CostReplica):
    """Counts the pad tokens it is sent: positions past each row's own length (the
    benchmark's tokens are 1..length, so a 0 is a pad)."""

    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        if path == PREDICT:
            tensor = codec.decode_predict_request(request).inputs["x"]
            self.padding_units += int((np.frombuffer(tensor.data, "<i4") == 0).sum())
        return await super().call(path, request, timeout)


def sequence_runs(args: argparse.Namespace) -> None:
    lengths = list(range(1, 257))
    systems: dict[str, dict[str, Any]] = {
        "exact length (today)": {},
        "variable length, no buckets": {"variable_length_inputs": (("x", 0.0),)},
        "variable length + buckets 32,64,128,256": {
            "variable_length_inputs": (("x", 0.0),), "length_buckets": (32, 64, 128, 256)},
    }
    print("## Sequence traffic: 2 replicas x (2 ms + 2 us x rows x length), lengths 1..256, "
          "1-row calls, max batch 32, timeout 2 ms")
    print("| offered/s | system | OK/s | x today | refused | p50 ms | p99 ms | p99 x today "
          "| pad tokens per real token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in args.seq_rates:
        base: Run | None = None
        for name, extra in systems.items():
            config = BatchingConfig(max_batch_size=32, batch_timeout_micros=2000, **extra)
            replicas = [TokenCounter(0.002, 2e-6, True) for _ in range(2)]
            run = run_virtual(drive(config, replicas, rate, lengths, args.duration,
                                    args.seed, True))
            base = base or run
            print(f"| {rate:.0f} | {name} | {run.ok_per_s:.0f} | "
                  f"{run.ok_per_s / base.ok_per_s:.2f} | {run.refused:.1%} | "
                  f"{run.p50_ms:.1f} | {run.p99_ms:.1f} | {run.p99_ms / base.p99_ms:.2f} | "
                  f"{run.pad_per_real:.2f} |")


def allowed_runs(args: argparse.Namespace) -> None:
    shapes = {"fixed cost dominant (20 ms + 0.1 ms/row)": (0.020, 0.0001),
              "per-row cost dominant (1 ms + 1 ms/row)": (0.001, 0.001)}
    print()
    print("## Allowed batch sizes 8,16,32 (max batch 32, timeout 2 ms), 2 replicas, 1-row "
          "calls; load is offered / (2 x 32 / cost of 32 rows)")
    print("| cost shape | load | policy | OK/s | p50 ms | p99 ms | p99 x pad_up "
          "| padding rows per real row |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, (a, b) in shapes.items():
        capacity = 2 * 32 / (a + 32 * b)
        for load in args.loads:
            base: Run | None = None
            for policy in ("pad_up", "batch_down", "min_cost"):
                config = BatchingConfig(max_batch_size=32, batch_timeout_micros=2000,
                                        allowed_batch_sizes=(8, 16, 32),
                                        padding_policy=policy)
                replicas = [CostReplica(a, b, False) for _ in range(2)]
                run = run_virtual(drive(config, replicas, load * capacity, [4],
                                        args.duration, args.seed, False))
                base = base or run
                print(f"| {shape} | {load:.0%} | {policy} | {run.ok_per_s:.0f} | "
                      f"{run.p50_ms:.1f} | {run.p99_ms:.1f} | {run.p99_ms / base.p99_ms:.2f} | "
                      f"{run.pad_per_real:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seq_rates", type=lambda t: [float(x) for x in t.split(",")],
                        default=[300.0, 1000.0, 3000.0])
    parser.add_argument("--loads", type=lambda t: [float(x) for x in t.split(",")],
                        default=[0.3, 0.6, 0.9])
    parser.add_argument("--only", choices=("sequence", "allowed"), default=None)
    args = parser.parse_args()
    if args.only != "allowed":
        sequence_runs(args)
    if args.only != "sequence":
        allowed_runs(args)


if __name__ == "__main__":
    main()
