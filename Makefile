# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# torch is installed first with exact pins so nothing later pulls a different build.
$(STAMP): pyproject.toml infra/docker/requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	# The lock (the versions the tests last passed with) constrains every package it names: a fresh machine gets
	# them rather than whatever was released since (a botocore newer than aiobotocore accepts sent pip
	# backtracking through every Ray release). Tools only the tests use are not in it and come unpinned.
	$(BIN)/pip install -e '.[dev]' -c infra/docker/requirements.lock
	touch $(STAMP)

# DEPLOYMENT=cifar10 runs the real experiment's deployment instead of the CPU smoke one.
DEPLOYMENT ?= smoke

demo: setup
	DATA_ROOT=$(DATA_ROOT) BIN=$(BIN) DEPLOYMENT=$(DEPLOYMENT) bash infra/local/demo.sh

# CI runs this: lint first, so a type or style error fails in seconds rather than after the suite.
test: setup lint
	DATA_ROOT=$(DATA_ROOT) $(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	DATA_ROOT=$(DATA_ROOT) $(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# mypy checks the paths in pyproject.toml's [tool.mypy] (vitmodels/ and tasks/).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache
