# One entry point for every routine task. Each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUFF_FLAGS := --line-length 100 --target-version py311

.PHONY: install run test unit e2e vllm demo lint typecheck

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,uvicorn]'
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

# Everything CI runs: lint, types, the unit and fault-injection suite, then the end-to-end
# tests against real vLLM (installs vLLM's CPU build into a virtualenv of its own first).
test: lint typecheck unit e2e

unit: install
	$(BIN)/python -m pytest

# vLLM keeps its own virtualenv (VLLM_VENV, default ~/.cache/vllm-gateway/vllm-venv):
# its pins (torch, transformers) are not the gateway's.
vllm:
	bash bench/install_vllm.sh

e2e: install vllm
	$(BIN)/python -m pytest -m e2e

# Three real vLLM servers (tiny-a; two replicas of tiny-b) and the gateway on :8080.
demo: install vllm
	$(BIN)/python -m bench.demo

# Benchmarks (bench/README.md): every installed contender, table and plots in bench/results/.
# bench-deps adds the optional contenders: nginx (Debian package), vllm-router and LiteLLM
# (each in its own virtualenv under $(VENV)/contenders/, away from the gateway's pins).
.PHONY: bench bench-full bench-deps

$(BIN)/.bench-installed: bench/requirements.txt $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: install $(BIN)/.bench-installed
	$(BIN)/python bench/run.py --quick

bench-full: install $(BIN)/.bench-installed
	$(BIN)/python bench/run.py --out-dir bench/results/full

bench-deps: install
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
		{ apt-get update && apt-get install -y nginx-light; }
	test -x $(VENV)/contenders/vllm-router/bin/python || $(PYTHON) -m venv $(VENV)/contenders/vllm-router
	$(VENV)/contenders/vllm-router/bin/python -m pip install --quiet vllm-router
	test -x $(VENV)/contenders/litellm/bin/python || $(PYTHON) -m venv $(VENV)/contenders/litellm
	$(VENV)/contenders/litellm/bin/python -m pip install --quiet 'litellm[proxy]'
