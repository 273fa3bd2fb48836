# One command to run, one to test; each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per install level: `make run` installs the runtime only (no TensorFlow), `make
# test` adds the test, interop and plot extras, so running it after `make run` upgrades.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
CORE_SO = $(wildcard src/batchproxy/_core*.so)

.PHONY: run test test-core test-interop test-docker bench lint build clean

$(RUN_STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . 'cython>=3.0' 'grpcio-tools>=1.60'
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[test,interop,plot]'
	touch $(TEST_STAMP)

# The compiled core, rebuilt in place whenever its source changes. The runtime level installs
# Cython and grpcio-tools beside the package for this step (pip builds in isolation and
# leaves neither in the venv); both are small, TensorFlow stays out.
build: $(RUN_STAMP)
	$(PY) setup.py -q build_ext --inplace

# Flags for the proxy: make run ARGS="--model_name my_mnist_model"
run: build
	$(VENV)/bin/batchproxy serve $(ARGS)

# The interop suite imports TensorFlow, whose protobuf classes share names with ours, so it
# runs in a process of its own.
test: build $(TEST_STAMP)
	$(PY) -m pytest tests --ignore=tests/interop
	$(PY) -m pytest tests/interop

# The image built and docker-compose.yml run for real, with a Docker daemon of its own that
# is stopped again at the end (tests/docker/run.sh; needs root, dockerd, debootstrap and
# docker-compose). Its clients run in the test virtual environment: an existing $(VENV) is
# used as it is, a missing one is made first.
test-docker: $(if $(wildcard $(PY)),,$(TEST_STAMP))
	bash tests/docker/run.sh $(PY)

test-core: build $(TEST_STAMP)
	$(PY) -m pytest tests/test_core.py tests/test_hostile_input.py tests/test_fuzz.py

bench: build $(TEST_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

# ruff for style and mistakes, mypy for the type hints (its settings are in pyproject.toml).
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

clean:
	rm -rf build dist src/*.egg-info src/batchproxy/_core*.so src/batchproxy/_core.c
