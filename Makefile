# ruyi-pipeline: `make run` (set up + the whole tiny pipeline) and `make test` (set up + the suite).
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make test` workers (pytest-xdist); TEST_WORKERS=0 runs the suite serially in the pytest process.
TEST_WORKERS ?= 2
# The venv is rebuilt only when what it is made from changes, so a second `make setup` takes seconds.
DEPS   := pyproject.toml constraints.txt

# Offline by contract: nothing is fetched from a model hub at run time; tools keep their state local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast lint server llama clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): $(DEPS)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	# uv (pinned in constraints.txt) installs the pinned set, the same 266 packages at the same versions
	# as pip: `make setup` 59-75 s (uv's cache warm / empty) against pip's 2 min 42 s on 2 cores. uv
	# reads no pip configuration, so the find-links pip is configured with (where this machine keeps the
	# CPU wheel of torch) are handed to it, and torch is named explicitly so it takes that wheel.
	$(PY) -m pip install -q -c constraints.txt uv 2>&1 | { grep -v "is ignored: it is neither" || true; }
	links=(); for l in $$($(PY) -m pip config list | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p"); do links+=(--find-links "$$l"); done
	$(VENV)/bin/uv pip install -q --python $(PY) "$${links[@]}" -c constraints.txt "torch==2.13.0" -e ".[dev]"
	# Bytecode on every core afterwards (uv, like pip --no-compile, writes none): 35 s, 27k .pyc files,
	# which every stage process would otherwise compile again under PYTHONDONTWRITEBYTECODE=1. As pip
	# does, a file that is not valid Python 3.11 stays uncompiled (torch ships a test helper in 3.12
	# syntax), hence `|| true`.
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	$(PY) -m pip check
	$(PY) -c "import ruyi_model, tasks, torch, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with every pinned dependency (idempotent)

run: setup  ## set up, then run the whole pipeline on the tiny default
	$(VENV)/bin/ruyi run

test: setup lint  ## set up, lint, then run every test tier (unit, integration, slow end-to-end)
	# Two pytest workers (TEST_WORKERS=0: serial), a test file per worker at a time (--dist loadfile:
	# module fixtures are built once). Files are handed out in collection order, so the e2e files, the
	# longest (tests/e2e/test_pipeline_e2e.py: 644 of the suite's 2294 test-seconds), start first;
	# xdist's default (--loadscope-reorder) hands out the files with the most tests first and started
	# that file at 92% of the run. Stage subprocesses use one thread each (tests/conftest.py), so 2
	# workers fit 2 cores.
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-fast: setup  ## the unit tier only (no servers, no stage runs; under 3 minutes on 2 cores)
	$(PY) -m pytest -q tests/unit

lint: setup  ## ruff (lint + format), the import contracts (pyproject.toml [tool.importlinter]), dvc.yaml code deps, unique test names
	# pytest imports test modules by basename (rootdir mode): two files of one name abort collection.
	dup=$$(find tests -name 'test_*.py' -printf '%f\n' | sort | uniq -d); [ -z "$$dup" ] || { echo "error: test file names used twice under tests/: $$dup"; exit 1; }
	$(VENV)/bin/ruff check ruyi_model triton_kernels tasks flows data_contracts tests benchmarks
	$(VENV)/bin/ruff format --check ruyi_model triton_kernels tasks flows data_contracts tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m tasks.core.codedeps --check

server: setup  ## a Prefect server on 127.0.0.1:4200 serving the deployments (UI reruns)
	$(VENV)/bin/ruyi server

llama: setup  ## the optional extra `llama` (llama-cpp-python, pinned) into .venv: compiles llama.cpp (~15 min on 2 cores)
	$(PY) -m pip install -c constraints.txt -e ".[dev,llama]"
	$(PY) -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"

clean:  ## remove the venv and the tool caches (pytest, ruff); DVC outputs stay (dvc gc / git clean for those)
	rm -rf $(VENV) .pytest_cache .ruff_cache
