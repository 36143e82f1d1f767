# Gaussian Atlas: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch that lies on disk; on a GPU machine use
# e.g. `make demo TORCH_SPEC="torch>=2.4"` to keep the CUDA build pip resolves.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make serve` schedule; empty: params.yaml flow.cron (nightly, 03:00)
CRON ?=

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install demo test ui serve clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package with its pinned stack

demo: install  ## set up, then run the whole pipeline (Prefect flow over `dvc repro`) on the built-in dataset
	$(BIN)/python -m flows.pipeline run
	@echo
	@echo "Outputs: data/ (DVC-tracked), metrics/*.json, reports/ (contact sheets, great-expectations data docs)."
	@echo "MLflow:  make ui, then the runs page printed above (experiment 'gaussian-atlas', one parent run per pipeline run)"

test: install  ## set up, then run the test suite (CPU)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

ui:  ## open the MLflow UI on 127.0.0.1:5000 (runs: /#/experiments/<id>/runs?workflowType=machine_learning)
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning"
	@echo "  (<id>: printed by python -m flows.pipeline run; 1 in a fresh store. See mlflow/README.md)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5000

serve: install  ## scheduled retrains: a local Prefect server + `flows.pipeline serve` (CRON="0 3 * * *"); Ctrl-C stops both
	BIN=$(BIN) CRON="$(CRON)" bash flows/serve.sh

clean-outputs:  ## remove pipeline outputs (data/, metrics/, reports/); the MLflow store is kept
	rm -rf data metrics reports
