"""Shared fixtures: every codec test runs against both the compiled core and its pure-Python
twin, the way aiohttp runs its parser tests over the C and the Python parser."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from leaks import leaks

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


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """The session runs in a temporary directory of its own (children inherit TMPDIR), so
    other runs on the machine do not count; once every other fixture is torn down, a child
    process still running or a helper's folder left there fails the run."""
    directory = Path(tempfile.mkdtemp(prefix="batchproxy-tests-"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(directory)
    try:
        yield
        found = leaks(directory)
        assert not found, "the tests left behind:\n" + "\n".join(found)
    finally:
        tempfile.tempdir = saved[1]
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        shutil.rmtree(directory, ignore_errors=True)
