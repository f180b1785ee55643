# exprae — every set-up step lives here, so a fresh clone needs only `make train` / `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: on this CPU machine 2.13.0 comes from local disk; on a Linux GPU box
# the same pin from PyPI is the CUDA build. Override with e.g. `make install TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.exprae-installed
ARGS ?=
SWEEP ?=
EXPERIMENT ?= loss_sweep

.DEFAULT_GOAL := help
.PHONY: help install install-launchers train sweep compare test test-fast lint format tensorboard clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(STAMP) ## create .venv (if missing) and install exprae with its dev tools

install-launchers: $(STAMP) ## add the joblib (local parallel) and submitit (SLURM) Hydra launchers
	$(PY) -m pip install -q -e ".[dev,launchers]"

train: $(STAMP) ## train the default config on the bundled pbmc68k data (extra Hydra overrides: ARGS="loss=cosine")
	$(VENV)/bin/exprae-train $(ARGS)

sweep: $(STAMP) ## run a sweep experiment (EXPERIMENT=loss_sweep|latent_sweep|width_sweep, extra overrides: ARGS=...)
	$(VENV)/bin/exprae-train -m experiment=$(EXPERIMENT) $(ARGS)

compare: $(STAMP) ## report on a sweep: tables, verdicts and plots (SWEEP=multirun/<date>/<time>)
	@test -n "$(SWEEP)" || { echo "usage: make compare SWEEP=multirun/<date>/<time>"; exit 2; }
	$(VENV)/bin/exprae-compare $(SWEEP)

test: $(STAMP) ## run the full test suite (what CI runs)
	$(PY) -m pytest

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -m "not slow"

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check src tests scripts notebooks
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

tensorboard: $(STAMP) ## open TensorBoard on every run under outputs/ and multirun/
	$(VENV)/bin/tensorboard --logdir . --bind_all

clean: ## remove caches (keeps .venv and your runs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
