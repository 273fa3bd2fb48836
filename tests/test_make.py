"""The Makefile's install levels, read from `make -n` (a dry run: nothing is installed):
`make run` brings the runtime only, `make test` adds the extras the tests need."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(target: str, venv: Path, *args: str) -> list[str]:
    # --no-print-directory: under another make (CI runs the suite from `make test`) the
    # recursion would add "Entering directory" lines around the commands.
    proc = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    return [line for line in proc.stdout.splitlines() if not line.startswith("make[")]


def installs(lines: list[str]) -> list[str]:
    return [line for line in lines if "pip install" in line and "--upgrade pip" not in line]


def test_run_installs_the_runtime_without_extras(tmp_path: Path) -> None:
    lines = dry_run("run", tmp_path / "venv")
    assert installs(lines), lines
    for line in installs(lines):
        assert "[" not in line, f"make run installs extras: {line}"
        assert "tensorflow" not in line and "interop" not in line


def test_run_passes_args_to_serve(tmp_path: Path) -> None:
    lines = dry_run("run", tmp_path / "venv", "ARGS=--model_name my_mnist_model")
    assert lines[-1].endswith("batchproxy serve --model_name my_mnist_model"), lines


def test_test_after_run_adds_the_test_extras(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    # What `make run` left behind: the runtime level only.
    for line in dry_run("run", venv):
        if line.startswith("touch "):
            Path(line.split()[1]).touch()
    lines = dry_run("test", venv)
    extras = [line for line in installs(lines) if "[" in line]
    assert extras and "test" in extras[0] and "interop" in extras[0], lines
    # The runtime level is not installed again.
    assert all("[" in line for line in installs(lines)), lines


def test_readme_quick_start_uses_the_tutorial_model_name() -> None:
    readme = (ROOT / "README.md").read_text()
    assert 'make run ARGS="--model_name my_mnist_model"' in readme
    assert "/v1/models/my_mnist_model:predict" in readme
