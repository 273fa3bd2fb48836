"""What the per-model batching lookup adds to a call on the proxy's hot path.

Each batched call asks the scheduler for its model's batching (engine/model_batching.py):
a generation check and a dict lookup, the objects derived once per model and reload.
Measured in one run, in alternating rounds (the machine is shared), against the lookup
every call already paid before (the model's settings, for its latency objective) and
against deriving the batching afresh per call (what an uncached lookup would cost).

    PYTHONPATH=src .venv/bin/python benchmarks/model_batching_cost.py
"""

from __future__ import annotations

import statistics
import timeit

from batchproxy.config import BatchingConfig
from batchproxy.engine.model_batching import BatchingTable, ModelBatching
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.fleet.versions import ModelSettings, VersionRouter

ROUNDS = 7
N = 200_000


class NoTransport:
    async def call(self, path: str, request: bytes, timeout: float) -> bytes:
        raise AssertionError("not called")

    async def close(self) -> None:
        pass


def main() -> None:
    pool = ReplicaPool(["r:8500"], transports=lambda address: NoTransport())  # type: ignore[arg-type,return-value]
    flags = BatchingConfig()
    own = BatchingConfig(max_batch_size=16, allowed_batch_sizes=(4, 8, 16),
                         variable_length_inputs=(("tokens", 0.0),))
    settings = {f"m{i}": ModelSettings(batching=own if i % 2 else None, latency_slo_ms=50)
                for i in range(20)}
    router = VersionRouter(pool, settings)
    table = BatchingTable(flags, router)
    model = "m7"
    table.of(model)

    def before() -> float | None:
        return router.settings_of(model).latency_slo_ms

    def uncached() -> ModelBatching:
        found = router.settings_of(model)
        return ModelBatching(found.batching or flags, slo_ms=found.latency_slo_ms)

    old, new, fresh = [], [], []
    for _ in range(ROUNDS):
        old.append(timeit.timeit(before, number=N) / N)
        new.append(timeit.timeit(lambda: table.of(model), number=N) / N)
        fresh.append(timeit.timeit(uncached, number=N // 20) / (N // 20))
    med = statistics.median
    print(f"settings lookup (before): {med(old) * 1e9:.0f} ns/call")
    print(f"batching lookup (cached): {med(new) * 1e9:.0f} ns/call "
          f"-> {med(new) / med(old):.2f}x the lookup it replaces")
    print(f"derived per call (uncached): {med(fresh) * 1e9:.0f} ns/call "
          f"-> cached/uncached {med(new) / med(fresh):.3f}x")


if __name__ == "__main__":
    main()
