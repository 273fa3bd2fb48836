"""Shared fixtures: every codec test runs against both the compiled core and its pure-Python
twin, the way aiohttp runs its parser tests over the C and the Python parser."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

CORES = {"cython": "batchproxy._core", "python": "batchproxy.codec._core_py"}


def load_core(kind: str) -> ModuleType:
    try:
        return importlib.import_module(CORES[kind])
    except ImportError as exc:
        # A build without a C compiler still tests the twin; CI must test both.
        if kind == "cython" and not os.environ.get("CI"):
            pytest.skip(f"compiled core not built: {exc}")
        raise


# Session scope: the module never changes, and hypothesis refuses function-scoped fixtures.
@pytest.fixture(scope="session", params=list(CORES))
def core(request: pytest.FixtureRequest) -> ModuleType:
    return load_core(request.param)


@pytest.fixture(scope="session")
def both_cores() -> tuple[ModuleType, ModuleType]:
    """(compiled, python) for tests that compare the two."""
    return load_core("cython"), load_core("python")
