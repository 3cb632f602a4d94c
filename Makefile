# edge-agent: `make run` serves the default model, `make test` runs every test.
# Both do all set-up first through `make setup` (idempotent: a second run changes nothing).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
HOME_DIR := $(CURDIR)/var
export EDGE_AGENT_HOME ?= $(HOME_DIR)
export EDGE_AGENT_SOCKET ?= $(HOME_DIR)/agent.sock
# llama-cpp-python compiles llama.cpp from source (~11 min on 2 cores); pip keeps the
# built wheel in its cache, so only the first set-up on a machine pays for it.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup services run test check lint typecheck imports bench clean lock onnx-smollm2

setup: $(STAMP)

$(STAMP): requirements.lock requirements-build.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-virtualenv -r requirements-build.txt
	@# llama-cpp-python first, in a pip call of its own that shows pip's progress: without a
	@# built wheel (installed, in pip's cache or in a wheelhouse) it compiles llama.cpp, the
	@# one long step of the set-up, and one line says so before it starts.
	@scripts/llama-cpp-note.sh $(PY) requirements.lock $(CMAKE_BUILD_PARALLEL_LEVEL)
	$(PY) -m pip install --no-deps --no-compile --require-virtualenv $$(grep -iE '^llama[-_.]cpp[-_.]python==' requirements.lock)
	$(PY) -m pip install --quiet --no-deps --no-compile --require-virtualenv -r requirements.lock
	@# Byte code for every module, compiled on all cores (pip compiles one package at a time:
	@# 75 s → 66 s here). Processes that cannot write the venv (sandboxed units, dropped
	@# users) would otherwise compile each module on every start.
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null
	@# -W: setuptools' notice that an editable install maps the packages to the source tree
	@# (which is the point of it) is not for the reader of this log.
	$(PY) -W 'ignore:Editable installation' -m pip install --quiet --no-deps --no-build-isolation --require-virtualenv -e .
	@touch $(STAMP)

run: setup
	@mkdir -p $(HOME_DIR) && chmod 0750 $(HOME_DIR)
	@# Marks this state dir for the CLI: `edge-agent ...` run in this checkout (with none of
	@# this environment) talks to this daemon. README "Which daemon the CLI talks to".
	@printf '# Written by make run: the edge-agent CLI run in this checkout uses this daemon.\nhome = "%s"\nsocket = "%s"\n' \
	  '$(EDGE_AGENT_HOME)' '$(EDGE_AGENT_SOCKET)' > $(HOME_DIR)/edge-agent-dev.toml && chmod 0644 $(HOME_DIR)/edge-agent-dev.toml
	$(VENV)/bin/edge-agent models pull smollm2-135m
	@# serve prints where it serves and what to paste once the socket is bound: a second
	@# `make run` fails ("another edge-agent is already serving") without claiming to serve.
	exec $(VENV)/bin/edge-agent serve --try-it smollm2-135m

services:
	@scripts/debian-packages.sh

test: setup services
	$(VENV)/bin/pytest

check: setup lint typecheck imports

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

imports:
	$(VENV)/bin/lint-imports

# The units as systemd reads them: verify both, and print the service's exposure rating
# (systemd-analyze security; goal <= 2.0, tests/test_systemd_units.py enforces it).
.PHONY: units
check: units
units:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp systemd/edge-agent.socket "$$tmp"/ && \
	  sed 's#^ExecStart=[^ ]*#ExecStart=$(CURDIR)/$(VENV)/bin/edge-agent#' systemd/edge-agent.service > "$$tmp"/edge-agent.service && \
	  cd "$$tmp" && SYSTEMD_UNIT_PATH="$$tmp:" systemd-analyze verify --man=no ./edge-agent.socket ./edge-agent.service && \
	  SYSTEMD_UNIT_PATH="$$tmp:" systemd-analyze security --offline=true --no-pager ./edge-agent.service | tail -n 1

bench: setup
	$(PY) bench/selection.py
	$(PY) bench/serve.py
	$(PY) bench/authz.py
	$(PY) bench/embeddings.py
	$(PY) bench/sync.py

# The onnxruntime-genai build of SmolLM2 (a second variant of smollm2-135m), made here from
# the packaged GGUF; torch/transformers go to a throwaway venv under var/ (~3 GB).
onnx-smollm2: setup
	$(PY) bench/build_onnx_smollm2.py var/models/smollm2-135m-onnx-int4

# Re-pin every dependency from the current environment (run after changing pyproject).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^edge-agent' > requirements.lock
	$(PY) scripts/runtime_lock.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
