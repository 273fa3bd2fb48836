"""Batching gain: two replicas with a GPU-like cost model (batch_cost_ms 50, row_cost_us 50,
one batch at a time each) and 256 one-row callers, sent straight to the replicas round robin
(no batching: every call is a 50 ms batch of one), then through the proxy (max_batch_size
64), against the ideal throughput of the cost model:
    replicas x max_batch_size / (batch_cost + max_batch_size x row_cost).

REST callers (`--protocol rest`) cost the proxy and the generator less CPU per call than
gRPC ones, so on a small machine they show the batching itself rather than the cores run
out; the proxy batches both the same way.

    .venv/bin/python benchmarks/e2e/batching_gain.py [--seconds 10] [--policy adaptive]
    .venv/bin/python benchmarks/e2e/batching_gain.py --protocol rest
"""

from __future__ import annotations

import argparse

from harness import (
    ExitStack,
    LoadSpec,
    Measured,
    Process,
    fmt,
    grpc_spec,
    histogram_totals,
    machine,
    measure,
    rest_spec,
    start_proxy,
    start_replica,
    timed,
)

REPLICAS = 2
BATCH_COST_MS = 50.0
ROW_COST_US = 50.0
MAX_BATCH_SIZE = 64
CALLERS = 256


def ideal_rps() -> float:
    return REPLICAS * MAX_BATCH_SIZE / (BATCH_COST_MS / 1e3 + MAX_BATCH_SIZE * ROW_COST_US / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per run")
    parser.add_argument("--policy", default="fixed", help="the proxy's flush policy")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc",
                        help="how the callers reach the replicas and the proxy")
    args = parser.parse_args()
    rest = args.protocol == "rest"

    def spec(targets: list[Process], **load: object) -> LoadSpec:
        if rest:
            return rest_spec([t.rest_url.removeprefix("http://") for t in targets], **load)
        return grpc_spec([t.address for t in targets], **load)

    unbatched_rps = REPLICAS / (BATCH_COST_MS / 1e3 + ROW_COST_US / 1e6)
    # Direct: 256 callers queue on 2 replicas doing ~40 calls/s, so a call waits ~6.4 s;
    # the warm-up lets that queue form before measuring.
    direct_warmup = 1.2 * CALLERS / unbatched_rps
    print(f"machine: {machine()}")
    with ExitStack() as stack:
        replicas = [stack.enter_context(start_replica(
            "identity", model_name="default", batch_cost_ms=BATCH_COST_MS,
            row_cost_us=ROW_COST_US)) for _ in range(REPLICAS)]
        proxy = stack.enter_context(start_proxy(replicas, max_batch_size=MAX_BATCH_SIZE,
                                                batching_policy=args.policy))
        print(f"replicas: {' '.join(replicas[0].args[1:])} (x{REPLICAS}); "
              f"proxy: {' '.join(proxy.args[1:])}")
        runs: dict[str, Measured] = {}
        # The proxy first: a direct run ends with its callers' calls still queued at the
        # replicas (seconds of them), which a REST replica runs to the end after its
        # callers hang up, and which would stand in front of the proxy's first batches.
        with timed(f"through the proxy, {CALLERS} callers"):
            rows_before = histogram_totals(proxy.rest_url, "batchproxy_batch_rows")
            runs["proxy"] = measure(spec(
                [proxy], concurrency=CALLERS, duration_s=args.seconds, warmup_s=1.0,
                timeout_s=60.0), [proxy.pid], [r.pid for r in replicas])
            rows_after = histogram_totals(proxy.rest_url, "batchproxy_batch_rows")
        with timed(f"direct, round robin, {CALLERS} callers ({direct_warmup:.0f} s warm-up)"):
            runs["direct"] = measure(spec(
                replicas, concurrency=CALLERS, duration_s=args.seconds,
                warmup_s=direct_warmup, timeout_s=60.0), [r.pid for r in replicas])
    ideal = ideal_rps()
    direct = runs["direct"].rps
    print(f"\nbatching gain ({args.protocol}), {REPLICAS} replicas x (batch {BATCH_COST_MS:g} ms + "
          f"{ROW_COST_US:g} us/row), {CALLERS} one-row callers, max_batch_size {MAX_BATCH_SIZE}")
    print(f"  {'':22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x direct':>10}{'x ideal':>9}")
    for name in ("direct", "proxy"):
        m = runs[name]
        print(f"  {name:22}{fmt(m.rps):>9}{fmt(m.p50):>9}{fmt(m.p99):>9}"
              f"{m.rps / direct:>10.1f}{m.rps / ideal:>9.2f}")
    print(f"  {'ideal (cost model)':22}{fmt(ideal):>9}{'':18}{ideal / direct:>10.1f}{1:>9.2f}")
    print(f"  (direct's own ideal: {unbatched_rps:.1f} req/s)")
    batches = rows_after[1] - rows_before[1]
    mean_rows = (rows_after[0] - rows_before[0]) / batches if batches else float("nan")
    print(f"  proxy: {batches:,.0f} batches of {mean_rows:.1f} rows on average "
          "(warm-up included)")
    proxy_m = runs["proxy"]
    print(f"  proxy CPU {fmt(proxy_m.server_cpu_us)} us/request, replicas "
          f"{fmt(proxy_m.others_cpu_us)} us/request, generator "
          f"{fmt(proxy_m.generator_cpu_us)} us/request")


if __name__ == "__main__":
    main()
