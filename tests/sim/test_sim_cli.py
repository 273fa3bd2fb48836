"""`batchproxy simulate` end to end, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

ARGS = ["--replicas", "2", "--load", "0.3,0.8", "--duration", "1", "--jitter", "0.1",
        "--network_ms", "2",
        "--deadline_ms", "200", "--fault", "crash:1:0.2-0.4", "--seed", "3"]


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchproxy", "--log_level", "WARNING",
                           "simulate", *args], capture_output=True, text=True, timeout=120)


def test_json_and_table(tmp_path):
    out = tmp_path / "sim.json"
    done = simulate(*ARGS, "--json", str(out))
    assert done.returncode == 0, done.stderr
    for system in ("direct", "tfs", "proxy"):
        assert system in done.stdout
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert [(r["system"], r["load"]) for r in runs] == [
        ("direct", 0.3), ("tfs", 0.3), ("proxy", 0.3),
        ("direct", 0.8), ("tfs", 0.8), ("proxy", 0.8)]
    for run in runs:
        for key in ("requests", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "goodput_per_s",
                    "mean_batch_rows", "errors"):
            assert key in run
    assert data["config"]["faults"][0]["kind"] == "crash"
    assert data["config"]["network_ms"] == 2.0
    # Another process, same seed: the same bytes.
    again = tmp_path / "again.json"
    assert simulate(*ARGS, "--json", str(again)).returncode == 0
    assert again.read_bytes() == out.read_bytes()


def test_plot(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (the plot extra)")
    png = tmp_path / "sim.png"
    done = simulate(*ARGS, "--plot", str(png), "--baselines", "tfs,proxy")
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_and_bad_flags(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,rows,model,deadline_ms\n0,1,m,\n0.5,4,n,50\n")
    done = simulate("--trace", str(trace), "--baselines", "proxy", "--json",
                    str(tmp_path / "t.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "t.json").read_text())["runs"][0]["requests"] == 2
    bad = simulate("--fault", "melt:0:1-2")
    assert bad.returncode != 0 and "unknown fault kind" in bad.stderr
