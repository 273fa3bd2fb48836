"""What the fleet knows of each replica, as plain data: state, batches in flight, when it is
expected to be free, and per model the learned cost. The debug endpoint serves it as JSON;
the metrics sampler reads the same numbers."""

from __future__ import annotations

from typing import Any

from batchproxy.fleet.slots import ReplicaPool, loop_time


def fleet_snapshot(pool: ReplicaPool) -> dict[str, Any]:
    now = loop_time()
    replicas = []
    for replica in sorted(pool.replicas.values(), key=lambda r: r.address):
        replicas.append({
            "address": replica.address,
            "state": replica.state.value,
            "in_flight": replica.outstanding,
            "max_in_flight": pool.max_inflight,
            "expected_free_in_ms": round(max(replica.free_at - now, 0.0) * 1000, 3),
            "trip_ms": round(replica.trip_s * 1000, 3),
            "models": {
                model: {"state": replica.models[model].value if model in replica.models
                        else "unchecked", **cost.to_dict()}
                for model, cost in sorted(replica.costs.items())
            },
        })
    # The proxy's own turn from an answer to the next send (fleet/turn.py), this worker's.
    return {"replicas": replicas, "turn_ms": round(pool.turn.seconds * 1000, 3)}
