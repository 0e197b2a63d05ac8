# Two commands do everything on a fresh clone:
#   make demo   create .venv if needed, install, run the whole pipeline on the embedded data
#   make test   same install, then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# Stage instances `make demo` runs at once (flows/repro.py); JOBS=1 is a plain `dvc repro`.
JOBS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Keep the tools quiet and offline-friendly (no telemetry, no dashboards).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench clean-demo help

help:
	@echo "make demo   - install into $(VENV) and run the whole pipeline (dvc repro, JOBS=$(JOBS) stages at a time) on the embedded data"
	@echo "make test   - install into $(VENV) and run the test suite"
	@echo "make bench  - run the benchmarks in benchmarks/ (quick mode)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	@test -d .dvc || { echo "no .dvc/ here: run from a git clone of the project"; exit 1; }
	time $(PY) -m flows.repro --jobs $(JOBS)
	$(VENV)/bin/dvc status
	@echo "demo done: see reports/index.html, 'dvc metrics show', and 'mlflow ui --backend-store-uri sqlite:///mlflow.db'"

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done
