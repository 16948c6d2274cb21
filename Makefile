# Two commands on a fresh machine (Python >= 3.11 with venv):
#   make demo   - create .venv, install, replay a compressed spot trace on a local cluster
#   make test   - create .venv, install with test extras, lint and run the test suite
# GPU users: install their CUDA build of torch first, or pass TORCH= (empty) / TORCH=torch.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build; keeps pip from pulling a multi-GB CUDA build on machines without a GPU.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench up clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spotserve-loadgen demo

up: $(STAMP)
	$(BIN)/spotserve up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) lint
	./.ci/ensure-docker-compose
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.decode_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
