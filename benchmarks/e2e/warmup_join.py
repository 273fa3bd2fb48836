"""Latency when a replica joins under load, with and without warm-up: reference replicas
whose first Predict at each batch size takes --first_call_ms longer (as graph tracing does),
identity model at 2 ms a batch, the proxy (max_batch_size 8, fixed policy, no hedging) in
front, 6 closed-loop callers of 1 to 3 rows. One replica serves; after --before_s a second
one starts (it was down: the proxy has it in its list) and the load runs --after_s more.
The first replica is warmed by direct calls before the load in both modes.
Reported per mode: p99 and max latency of the calls before the join (the baseline, same
run) and of the calls started after it, and after / before-p99 ratios. Rounds alternate
warm, cold, warm, cold...

    .venv/bin/python benchmarks/e2e/warmup_join.py [--rounds 2] [--first_call_ms 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import requests
from harness import HOST, free_port, machine, start_proxy, start_replica
from model_dirs import add_version  # tests/, on the path through harness

from batchproxy.protos import predict_pb2, services_pb2_grpc, tensor_pb2

NAME = "traced"
MAX_BATCH = 8
CALLERS = 6


def caller(address: str, seed: int, stop: threading.Event,
           calls: list[tuple[float, float]], errors: list[str]) -> None:
    rng = np.random.default_rng(seed)
    channel = grpc.insecure_channel(address)
    stub = services_pb2_grpc.PredictionServiceStub(channel)
    while not stop.is_set() and len(calls) < 200_000:
        rows = int(rng.integers(1, 4))
        start = time.perf_counter()
        try:
            predict(stub, rows)
        except grpc.RpcError as err:
            errors.append(err.code().name)
            continue
        calls.append((start, time.perf_counter() - start))
    channel.close()


def predict(stub: services_pb2_grpc.PredictionServiceStub,
            rows: int) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    tensor = request.inputs["x"]
    tensor.dtype = tensor_pb2.DT_FLOAT
    tensor.tensor_shape.dim.add(size=rows)
    tensor.tensor_shape.dim.add(size=4)
    tensor.tensor_content = np.ones((rows, 4), np.float32).tobytes()
    return stub.Predict(request, timeout=30)


def prewarm(address: str) -> None:
    """Every batch size once, straight to the replica: in both modes the first replica is
    warm before the load starts, so the rounds differ only in how the second one joins."""
    with grpc.insecure_channel(address) as channel:
        stub = services_pb2_grpc.PredictionServiceStub(channel)
        for rows in range(1, MAX_BATCH + 1):
            predict(stub, rows)


def healthy(proxy_url: str, address: str) -> bool:
    text = requests.get(f"{proxy_url}/metrics", timeout=10).text
    return f'batchproxy_replica_healthy{{replica="{address}"}} 1.0' in text


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def one_round(base: Path, warm: bool, before_s: float, after_s: float) -> dict[str, float]:
    first = start_replica("identity", model_name=NAME, model_base_path=base,
                          file_system_poll_wait_seconds=0)
    prewarm(first.address)
    port = free_port()
    flags: dict[str, object] = {"no_warmup": not warm}
    proxy = start_proxy([first, f"{HOST}:{port}"], health_check_model=NAME,
                        health_interval_ms=200, max_batch_size=MAX_BATCH,
                        hedge_budget_percent=0, **flags)
    second = None
    stop = threading.Event()
    calls: list[tuple[float, float]] = []
    errors: list[str] = []
    threads = [threading.Thread(target=caller, args=(proxy.address, i, stop, calls, errors))
               for i in range(CALLERS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        measured_from = time.perf_counter()
        time.sleep(before_s)
        joined = time.perf_counter()
        second = start_replica("identity", port=port, model_name=NAME, model_base_path=base,
                               file_system_poll_wait_seconds=0)
        deadline = time.monotonic() + 60
        while not healthy(proxy.rest_url, f"{HOST}:{port}") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(after_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        proxy.stop()
        first.stop()
        if second is not None:
            second.stop()
    before = [lat for start, lat in calls if measured_from <= start < joined]
    after = [lat for start, lat in calls if start >= joined]
    return {"before_p99": p99(before), "before_max": max(before, default=float("nan")),
            "after_p99": p99(after), "after_max": max(after, default=float("nan")),
            "after_calls": len(after), "errors": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="round pairs (warm, cold)")
    parser.add_argument("--first_call_ms", type=float, default=300.0)
    parser.add_argument("--before_s", type=float, default=3.0)
    parser.add_argument("--after_s", type=float, default=4.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    results: dict[str, list[dict[str, float]]] = {"warm-up": [], "no warm-up": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / NAME
        add_version(base, 1, model="identity", batch_cost_ms=2,
                    first_call_at_new_batch_size_ms=args.first_call_ms)
        for _ in range(args.rounds):
            for mode, warm in (("warm-up", True), ("no warm-up", False)):
                result = one_round(base, warm, args.before_s, args.after_s)
                results[mode].append(result)
                print(mode, {k: round(v, 4) for k, v in result.items()}, flush=True)
    print(f"\nfirst-call delay {args.first_call_ms:.0f} ms; medians over {args.rounds} rounds")
    print("| | before p99 | after p99 | after max | after p99 / before p99 | "
          "after max / before p99 | calls after | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, rounds in results.items():
        def med(key: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.median(r[key] for r in rounds)
        print(f"| {mode} | {med('before_p99') * 1e3:.1f} ms | {med('after_p99') * 1e3:.1f} ms "
              f"| {med('after_max') * 1e3:.1f} ms "
              f"| {statistics.median(r['after_p99'] / r['before_p99'] for r in rounds):.2f}x "
              f"| {statistics.median(r['after_max'] / r['before_p99'] for r in rounds):.2f}x "
              f"| {med('after_calls'):.0f} | {sum(r['errors'] for r in rounds):.0f} |")


if __name__ == "__main__":
    main()
