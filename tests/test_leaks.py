"""The leak check itself: it sees a child process and a helper's folder, and a skip in a
Prometheus test leaves neither."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import prometheus_server
import pytest
from leaks import leaks


def test_a_running_child_is_a_leak(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = leaks(tmp_path, grace_s=0.2)
        assert any(str(child.pid) in line for line in found), found
    finally:
        child.kill()
        child.wait()
    assert leaks(tmp_path, grace_s=0.2) == []


def test_a_helper_folder_is_a_leak(tmp_path: Path) -> None:
    (tmp_path / "batchproxy-prometheus-x").mkdir()
    assert leaks(tmp_path, grace_s=0.1) == [f"temporary path {tmp_path}/batchproxy-prometheus-x"]


def test_prometheus_missing_skips_without_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    directory = Path(tempfile.gettempdir())
    before = set(directory.glob("batchproxy-prometheus-*"))
    with pytest.raises(pytest.skip.Exception):
        prometheus_server.Prometheus(["127.0.0.1:1"])
    assert set(directory.glob("batchproxy-prometheus-*")) == before
