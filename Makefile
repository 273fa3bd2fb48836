# One command to run, one to test; each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORE_SO = $(wildcard src/batchproxy/_core*.so)

.PHONY: run test test-core test-interop bench lint build clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,interop,plot]'
	touch $(STAMP)

# The compiled core, rebuilt in place whenever its source changes.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

run: build
	$(VENV)/bin/batchproxy serve

# The interop suite imports TensorFlow, whose protobuf classes share names with ours, so it
# runs in a process of its own.
test: build
	$(PY) -m pytest tests --ignore=tests/interop
	$(PY) -m pytest tests/interop

test-core: build
	$(PY) -m pytest tests/test_core.py tests/test_hostile_input.py tests/test_fuzz.py

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf build dist src/*.egg-info src/batchproxy/_core*.so src/batchproxy/_core.c
