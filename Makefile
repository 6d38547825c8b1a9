# accllm set-up, demo and tests. `make demo` and `make test` set everything up first if needed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.accllm-setup
TEXT_DIR ?= $(abspath $(wildcard ../shared/data/text))
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast doctor clean

## setup: Icarus from apt (if missing), a .venv with requirements/pinned.txt, accllm in editable mode.
## Idempotent and quick when already done (the venv is redone only when the requirement files change).
setup: $(STAMP)
	@command -v iverilog >/dev/null || { echo "installing iverilog (apt)"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq --no-install-recommends iverilog; }
	@command -v chromium >/dev/null || { echo "installing chromium (apt; headless rendering check of accllm report)"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq --no-install-recommends chromium || \
	  echo "chromium not installed: tests/sim/test_estimate.py skips its rendering check"; }

$(STAMP): requirements/pinned.txt requirements/nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 (or make PYTHON=python3)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/pinned.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

## demo: the main job on the built-in default configuration, offline.
demo: setup
	$(BIN)/accllm run --config configs/run/demo.yaml --out build/demo

## test: the suite (slow-marked suites included, heavy ones not), two workers.
test: setup
	ACCLLM_TEXT_DIR=$(TEXT_DIR) $(BIN)/python -m pytest -n 2 -m "not heavy" $(PYTEST_ARGS)

## test-fast: everything but the slow- and heavy-marked suites.
test-fast: setup
	ACCLLM_TEXT_DIR=$(TEXT_DIR) $(BIN)/python -m pytest -n 2 -m "not slow and not heavy" $(PYTEST_ARGS)

## test-heavy: only the heavy-marked suites (extra Verilator builds, deep proofs, flat Yosys runs).
test-heavy: setup
	ACCLLM_TEXT_DIR=$(TEXT_DIR) $(BIN)/python -m pytest -n 2 -m heavy $(PYTEST_ARGS)

doctor: setup
	$(BIN)/accllm doctor

clean:
	rm -rf build .pytest_cache .hypothesis
