# One entry point for every routine task. Each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUFF_FLAGS := --line-length 100 --target-version py311

.PHONY: install run test lint typecheck

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Run the gateway: GATEWAY_BACKENDS=http://host:8000,... make run
run: install
	$(BIN)/vllm-gateway

lint: install
	$(BIN)/ruff check $(RUFF_FLAGS) --select E,F,W,I,UP,B gateway tests bench
	$(BIN)/ruff format --check $(RUFF_FLAGS) gateway tests bench

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest
