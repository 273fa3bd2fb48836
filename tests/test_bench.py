"""`batchproxy bench`, the load generator: bounded runs against the bare echo server and a
real reference replica; every run here ends in seconds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import HOST, Process, child_env, free_port, start_process, start_replica

from batchproxy.bench import LoadSpec, RunResult, payload, run_load
from batchproxy.bench.cli import add_bench_arguments, specs_from_args
from batchproxy.bench.report import table


@pytest.fixture(scope="module")
def echo() -> Iterator[Process]:
    port, rest_port = free_port(), free_port()
    with start_process([sys.executable, "-m", "batchproxy", "bench", "--echo_server", str(port),
                        "--echo_rest_port", str(rest_port), "--echo_host", HOST],
                       port, rest_port=rest_port) as proc:
        yield proc


@pytest.fixture(scope="module")
def replica() -> Iterator[Process]:
    with start_replica("identity", model_name="default") as proc:
        yield proc


def grpc_load(target: str, model: str = "default", **load: object) -> LoadSpec:
    return LoadSpec(targets=(target,), protocol="grpc", path=payload.PREDICT_PATH,
                    body=payload.grpc_predict_body(model, "x", 1, (1,)),
                    **load)  # type: ignore[arg-type]


def rest_load(target: str, model: str = "default", **load: object) -> LoadSpec:
    return LoadSpec(targets=(target,), protocol="rest",
                    path=payload.rest_predict_path(model),
                    body=payload.rest_predict_body(1, (1,)), **load)  # type: ignore[arg-type]


def assert_consistent(result: RunResult, ok: int) -> None:
    assert result.ok == ok
    assert result.failed == 0, result.errors
    assert result.latencies.size == ok  # one latency per answer, none lost in a merge
    assert result.in_window == ok
    latency = result.latency_ms()
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert result.throughput > 0


def test_closed_loop_request_count_against_echo(echo: Process) -> None:
    result = run_load(grpc_load(echo.address, concurrency=8, requests=200, duration_s=None))
    assert_consistent(result, 200)
    assert result.sent == 200


def test_processes_merge_every_latency(echo: Process) -> None:
    spec = grpc_load(echo.address, concurrency=8, requests=101, duration_s=None)
    result = run_load(spec, processes=2)
    assert result.processes == 2
    assert_consistent(result, 101)
    assert result.generator_cpu_s > 0


def test_rest_against_echo(echo: Process) -> None:
    result = run_load(rest_load(f"{HOST}:{echo.rest_port}", concurrency=4, requests=100,
                                duration_s=None))
    assert_consistent(result, 100)


def test_closed_loop_against_replica(replica: Process) -> None:
    result = run_load(grpc_load(replica.address, concurrency=4, requests=200, duration_s=None),
                      watch_pids=[replica.pid])
    assert_consistent(result, 200)
    assert result.watched_cpu_s is not None and result.watched_cpu_s >= 0


def test_open_loop_at_a_low_rate_for_one_second(replica: Process) -> None:
    started = time.monotonic()
    result = run_load(grpc_load(replica.address, rate=50.0, duration_s=1.0))
    assert time.monotonic() - started < 5
    assert 20 <= result.ok <= 100  # Poisson: 50 expected
    assert result.failed == 0
    assert result.elapsed_s == pytest.approx(1.0, abs=0.05)
    assert result.lags.size == result.sent
    assert result.lag_ms() is not None


def test_unknown_model_counts_not_found(replica: Process) -> None:
    result = run_load(grpc_load(replica.address, model="no_such_model", concurrency=2,
                                requests=30, duration_s=None))
    assert result.ok == 0
    assert result.errors == {"NOT_FOUND": 30}
    assert "NOT_FOUND 30" in table([result])


def test_rest_errors_are_counted_by_http_status(replica: Process) -> None:
    # A model the replica does not serve: TFS's REST API answers 404.
    result = run_load(rest_load(f"{HOST}:{replica.rest_port}", model="no_such_model",
                                concurrency=2, requests=10, duration_s=None))
    assert result.ok == 0
    assert result.errors == {"HTTP_404": 10}


def test_duration_bounds_a_run_whose_calls_never_end() -> None:
    # A replica that takes 30 s per call: the run still ends when its second is over.
    with start_replica("identity", model_name="default", batch_cost_ms=30_000) as slow:
        started = time.monotonic()
        result = run_load(grpc_load(slow.address, concurrency=4, duration_s=1.0))
        assert time.monotonic() - started < 4
        slow.stop(timeout_s=0.5)  # it would finish its 30 s "batch" before exiting
    assert result.ok == 0 and result.in_window == 0


def test_cli_json_and_table(echo: Process, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "batchproxy", "bench", "--target", echo.address,
         "--concurrency", "2,4", "--requests", "50", "--json", str(out)],
        capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "req/s" in proc.stdout and "p99 ms" in proc.stdout
    assert "[" in proc.stderr or "# grpc closed loop" in proc.stderr  # progress on stderr
    figures = json.loads(out.read_text())
    assert figures["command"].startswith("batchproxy bench")
    assert [run["concurrency"] for run in figures["runs"]] == [2, 4]
    for run in figures["runs"]:
        assert run["ok"] == 50 and run["errors"] == {}
        assert run["throughput_rps"] > 0 and run["rows_per_s"] == run["throughput_rps"]
        assert set(run["latency_ms"]) >= {"p50", "p90", "p99", "max"}


def test_plot(echo: Process, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from batchproxy.bench.plot import plot_latency

    spec = grpc_load(echo.address, rate=100.0, duration_s=0.5)
    results = [run_load(dataclasses.replace(spec, rate=rate)) for rate in (50.0, 100.0)]
    path = tmp_path / "latency.png"
    plot_latency(results, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_flags_always_give_a_bound_and_one_loop_kind() -> None:
    (spec,) = specs_from_args(parse())
    assert spec.duration_s == 10.0 and spec.concurrency == 64 and spec.requests is None
    (spec,) = specs_from_args(parse("-n", "5"))
    assert spec.duration_s is None and spec.requests == 5
    specs = specs_from_args(parse("--rates", "100,200", "--protocol", "rest"))
    assert [s.rate for s in specs] == [100.0, 200.0]
    assert specs[0].targets == ("127.0.0.1:8501",)
    assert specs[0].path == "/v1/models/default:predict"
    assert json.loads(specs[0].body)["instances"] == [[0.0]]
    with pytest.raises(ValueError):
        specs_from_args(parse("--rate", "5", "--concurrency", "3"))
    with pytest.raises(ValueError):
        LoadSpec(targets=("h:1",), protocol="grpc", path="/p", body=b"", concurrency=1,
                 duration_s=None)


def test_split_shares_callers_rate_and_requests() -> None:
    spec = LoadSpec(targets=("h:1",), protocol="grpc", path="/p", body=b"", concurrency=5,
                    requests=11)
    shares = spec.split(2)
    assert [s.concurrency for s in shares] == [3, 2]
    assert sum(s.requests or 0 for s in shares) == 11
    assert len(spec.split(8)) == 5  # no process without a caller
    open_loop = dataclasses.replace(spec, concurrency=0, rate=90.0).split(3)
    assert [s.rate for s in open_loop] == [30.0, 30.0, 30.0]
