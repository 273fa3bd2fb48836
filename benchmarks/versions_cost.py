"""What version routing adds to a `latest` call on the proxy's hot path.

A fleet of 64 replicas listing versions 1 and 2 of one model. Measured in one run, in
alternating rounds (the machine is shared): resolving a latest call's version from the
cached fleet view (what the scheduler does per call) against recounting the view (what it
would cost uncached), and merging a 64-call batch with the version override appended against
merging it without (the baseline: the merge every batch already pays), and the check that
a call's specific version is held anywhere (cached, against looking at every replica).

    PYTHONPATH=src .venv/bin/python benchmarks/versions_cost.py
"""

from __future__ import annotations

import statistics
import timeit

import numpy as np

from batchproxy import codec
from batchproxy.engine.queues import Batch, Entry, KeyQueue
from batchproxy.fleet.slots import ModelState, ReplicaPool
from batchproxy.fleet.versions import LatestPolicy, ModelSettings, VersionRouter
from batchproxy.protos import predict_pb2, tensor_pb2

REPLICAS = 64
ROUNDS = 7


class NoTransport:
    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        raise AssertionError("not called")

    async def close(self) -> None:
        pass


def fleet() -> VersionRouter:
    pool = ReplicaPool([f"r{i}:8500" for i in range(REPLICAS)],
                       transports=lambda address: NoTransport())  # type: ignore[arg-type,return-value]
    for i, replica in enumerate(pool.replicas.values()):
        versions = {1: 30, 2: 30 if i % 2 else 20}
        pool.record_check(replica, True, "", {"m": ModelState.AVAILABLE},
                          versions={"m": versions})
    settings = {"m": ModelSettings(latest=LatestPolicy.parse("share:0.5"), weights={2: 5.0})}
    return VersionRouter(pool, settings, seed=1)


def calls(n: int) -> list[codec.PredictCall]:
    out = []
    for _ in range(n):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        tensor = tensor_pb2.TensorProto(dtype=1)
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size=784)
        tensor.tensor_content = np.random.rand(1, 784).astype("<f4").tobytes()
        request.inputs["x"].CopyFrom(tensor)
        out.append(codec.decode_predict_request(request.SerializeToString()))
    return out


def main() -> None:
    router = fleet()
    batch_calls = calls(64)
    queue = KeyQueue(batch_calls[0].key)
    pieces = [(Entry(c, None, None, 0.0, queue, 0), 0, 1) for c in batch_calls]  # type: ignore[arg-type]
    n = 20000
    cached, uncached, plain, override = [], [], [], []
    check, recheck = [], []
    for _ in range(ROUNDS):
        cached.append(timeit.timeit(lambda: router.resolve_latest("m"), number=n) / n)
        uncached.append(timeit.timeit(lambda: router._count("m"), number=n) / n)
        # A call naming a version (or pinned, or a label's): is it held anywhere?
        check.append(timeit.timeit(lambda: router.refuse_absent("m", 2, True), number=n) / n)
        recheck.append(timeit.timeit(lambda: router._holds("m", 2), number=n) / n)
        plain.append(timeit.timeit(lambda: Batch.of("m", pieces), number=200) / 200)
        override.append(timeit.timeit(lambda: Batch.of("m", pieces, 2), number=200) / 200)
    med = statistics.median
    print(f"resolve_latest (cached view): {med(cached) * 1e6:.2f} us/call")
    print(f"recount the view (uncached):  {med(uncached) * 1e6:.2f} us/call "
          f"-> cached/uncached {med(cached) / med(uncached):.3f}x")
    print(f"version held anywhere (cached): {med(check) * 1e6:.2f} us/call; uncached "
          f"{med(recheck) * 1e6:.2f} us -> {med(check) / med(recheck):.3f}x; against "
          f"resolve_latest {med(check) / med(cached):.3f}x")
    print(f"merge 64 calls: {med(plain) * 1e6:.1f} us; with the version override "
          f"{med(override) * 1e6:.1f} us -> {med(override) / med(plain):.3f}x")


if __name__ == "__main__":
    main()
