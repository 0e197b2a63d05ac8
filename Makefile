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

.PHONY: install test demo bench clean-demo help mlflow-server
# `make mlflow-server`: one tracking server for the team (database backend, artifacts served by
# the server). Stages log to it with MLFLOW_TRACKING_URI=http://<host>:$(MLFLOW_PORT).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_HOME ?= mlflow-server
MLFLOW_BACKEND ?= sqlite:///$(abspath $(MLFLOW_HOME))/mlflow.db

help:
	@echo "make demo   - install into $(VENV) and run the whole pipeline (dvc repro, JOBS=$(JOBS) stages at a time) on the embedded data"
	@echo "make test   - install into $(VENV) and run the test suite"
	@echo "make bench  - run the benchmarks in benchmarks/ (quick mode)"
	@echo "make mlflow-server - an MLflow server on $(MLFLOW_HOST):$(MLFLOW_PORT) (MLFLOW_BACKEND=$(MLFLOW_BACKEND), artifacts in $(MLFLOW_HOME)/artifacts)"

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

mlflow-server: install
	@mkdir -p $(MLFLOW_HOME)/artifacts
	@echo "MLflow server: export MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (backend $(MLFLOW_BACKEND))"
	exec $(VENV)/bin/mlflow server --backend-store-uri '$(MLFLOW_BACKEND)' \
		--artifacts-destination '$(abspath $(MLFLOW_HOME))/artifacts' --serve-artifacts \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 2
