# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgelmm-installed
# llama-cpp-python compiles llama.cpp from source (~10 min on 2 cores); pip keeps the built wheel
# in its cache, so a re-install on the same machine reuses it instead of compiling again.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24"
	$(PY) -m pip install -e ".[export,llamacpp,watch,serve,dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -rs

test-fast: install
	$(PY) -m pytest -q -rs -m "not slow"

demo: install
	$(PY) -m edgelmm.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
