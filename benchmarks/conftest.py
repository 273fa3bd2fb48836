"""The `core` fixture for benchmarks: each benchmark runs on the compiled core and on its
pure-Python twin in the same session, grouped so pytest-benchmark shows them side by side."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

CORES = {"cython": "batchproxy._core", "python": "batchproxy.codec._core_py"}


@pytest.fixture(scope="session", params=list(CORES))
def core(request: pytest.FixtureRequest) -> ModuleType:
    try:
        return importlib.import_module(CORES[request.param])
    except ImportError as exc:
        if request.param == "cython":
            pytest.skip(f"compiled core not built: {exc}")
        raise
