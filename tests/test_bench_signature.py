"""`batchproxy bench` with no input flags builds its calls from the model's signature, fails
loudly when every call fails, and titles its plot with what was measured; against a real
`batchproxy serve` with a local reference replica, as `make run` starts it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from procs import HOST, Process, child_env, free_port, start_process

from batchproxy.bench import payload
from batchproxy.bench.plot import plot_title
from batchproxy.bench.results import RunResult
from batchproxy.bench.signature import fetch_inputs, row_shape
from batchproxy.bench.spec import LoadSpec
from batchproxy.protos import predict_pb2, tensor_pb2

MODEL = "my_mnist_model"


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    port, rest_port = free_port(), free_port()
    with start_process([sys.executable, "-m", "batchproxy", "serve", "--host", HOST,
                        "--port", str(port), "--rest_api_port", str(rest_port),
                        "--local_replicas", "1", "--model_name", MODEL],
                       port, rest_port=rest_port, timeout_s=60) as proc:
        yield proc


def bench(*flags: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "batchproxy", "bench", "--model", MODEL, "--requests", "40",
         "-c", "4", "--timeout", "30", "--quiet", "--json", str(out), *flags],
        capture_output=True, text=True, timeout=120, env=child_env())
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_row_shape_drops_the_batch_dimension_and_unknown_sizes_become_one() -> None:
    assert row_shape([-1, 28, 28]) == (28, 28)
    assert row_shape([-1, -1, 3]) == (1, 3)
    assert row_shape([-1]) == ()


def test_signature_read_from_the_proxy_over_grpc_and_rest(proxy: Process) -> None:
    assert proxy.rest_port is not None
    for target, protocol in ((proxy.address, "grpc"), (f"{HOST}:{proxy.rest_port}", "rest")):
        inputs = fetch_inputs(target, protocol, MODEL, "serving_default")
        assert {name: (spec.dtype, spec.row_shape) for name, spec in inputs.items()} == {
            "flatten_input": (tensor_pb2.DT_FLOAT, (28, 28))}, protocol


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_default_inputs_are_answered(proxy: Process, protocol: str, tmp_path: Path) -> None:
    port = proxy.port if protocol == "grpc" else proxy.rest_port
    proc, figures = bench("--protocol", protocol, "--target", f"{HOST}:{port}",
                          tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = figures["runs"][0]
    assert run["ok"] == 40 and run["failed"] == 0, run["errors"]


def test_every_call_failing_exits_non_zero_with_the_first_error(proxy: Process,
                                                                tmp_path: Path) -> None:
    # --input skips the signature: `x` of shape [1] is not what the demo model takes.
    proc, figures = bench("--target", proxy.address, "--input", "x", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert figures["runs"][0]["ok"] == 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("batchproxy bench: every call failed"), proc.stderr
    assert "INVALID_ARGUMENT: " in last and "flatten_input" in last


def test_nothing_listening_exits_non_zero(tmp_path: Path) -> None:
    proc, _ = bench("--target", f"{HOST}:{free_port()}", "--timeout", "1",
                    tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "batchproxy bench: " in proc.stderr.strip().splitlines()[-1]


def test_plot_title_names_model_rows_duration_and_transport() -> None:
    spec = LoadSpec(targets=("127.0.0.1:8501",), protocol="rest", path="/", body=b"",
                    rows=8, concurrency=4, duration_s=3.0, model=MODEL)
    result = RunResult(spec, 1, np.zeros(0), np.zeros(0), {}, 0, 0, 0, 0, 3.0, 0.0)
    title = plot_title([result])
    for part in (MODEL, "8 rows per call", "3 s", "rest"):
        assert part in title, (part, title)


def test_bodies_follow_each_inputs_dtype() -> None:
    body = payload.grpc_predict_body_for(
        "m", {"ids": (tensor_pb2.DT_INT64, (3,)), "text": (tensor_pb2.DT_STRING, ())}, 2)
    request = predict_pb2.PredictRequest.FromString(body)
    assert request.inputs["ids"].dtype == tensor_pb2.DT_INT64
    assert [d.size for d in request.inputs["ids"].tensor_shape.dim] == [2, 3]
    assert len(request.inputs["text"].string_val) == 2
