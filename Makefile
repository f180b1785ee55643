# exprae — every set-up step lives here, so a fresh clone needs only `make train` / `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# CI=true (set by GitHub Actions, GitLab and most CI services): `make test` builds a fresh virtual environment in
# .venv-ci from scratch every time, so CI installs what a new user installs and never reuses an old environment.
ifeq ($(CI),true)
VENV := .venv-ci
endif
PY := $(VENV)/bin/python
# torch is installed first and pinned: on this CPU machine 2.13.0 comes from local disk; on a Linux GPU box
# the same pin from PyPI is the CUDA build. Override with e.g. `make install TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.exprae-installed
ARGS ?=
SWEEP ?=
EXPERIMENT ?= loss_sweep

.DEFAULT_GOAL := help

.PHONY: help install install-launchers train sweep compare test test-fast test-gpu mutation lint format tensorboard bench batch-bench scvi-side-by-side mcv-vs-truth strip-notebooks clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
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

ifeq ($(CI),true)
test:
	rm -rf $(VENV)
	$(MAKE) --no-print-directory install lint
	$(PY) -m pytest -p no:cacheprovider
else
test: $(STAMP) ## run the full test suite (what CI runs; with CI=true: fresh .venv-ci, make lint, then every test)
	$(PY) -m pytest
endif

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -m "not slow"

test-gpu: $(STAMP) ## on a CUDA machine: every test marked gpu (refuses to run, rather than skip them all, without CUDA)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA device here; every gpu test would be skipped')"
	$(PY) -m pytest -m gpu -p no:cacheprovider

MODULES ?=
mutation: $(STAMP) ## mutation testing of the numerical core, module by module (MODULES="split masking"; tens of minutes)
	$(PY) -m pip install -q -e ".[mutation]"
	$(PY) scripts/mutation.py $(MODULES)

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check src tests scripts notebooks
	$(VENV)/bin/ruff format --check src tests scripts notebooks

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests scripts notebooks
	$(VENV)/bin/ruff format src tests scripts notebooks

DATA ?= ../shared/realdata/pbmc4k_soupx.h5ad
LATENT ?= 16
SCVI_ARGS ?=
scvi-side-by-side: $(STAMP) ## scVI vs PCA vs mean profile on exprae's split, x' and scores (DATA=file.h5ad LATENT=16; needs scvi-tools)
	$(PY) scripts/scvi_side_by_side.py $(DATA) --latent $(LATENT) --out scvi_side_by_side/$(notdir $(basename $(DATA)))_$(LATENT) $(SCVI_ARGS)

mcv-vs-truth: $(STAMP) ## does the MCV score rank denoisers like the distance to the truth? (synthetic counts sweep)
	$(PY) scripts/mcv_vs_truth.py --out mcv_vs_truth

BENCH_ARGS ?=
bench: $(STAMP) ## training-speed table: exprae vs a per-cell DataLoader vs scvi-tools (GPU sizes on a GPU; BENCH_ARGS="--sizes 1e5x2000")
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)" || echo "scvi-tools could not be installed; the table will skip it"
	$(PY) scripts/bench_train.py --out bench $(BENCH_ARGS)

BATCH_BENCH_ARGS ?=
batch-bench: $(STAMP) ## batch covariates where the answer is known: exprae vs PCA vs scVI on pbmc4k + batch effect and Kang (docs/batches.md)
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)" || echo "scvi-tools could not be installed; the table will skip it"
	$(PY) scripts/batch_benchmark.py --out bench/batches $(BATCH_BENCH_ARGS)

tensorboard: $(STAMP) ## open TensorBoard on every run under outputs/ and multirun/
	$(VENV)/bin/tensorboard --logdir . --bind_all

strip-notebooks: $(STAMP) ## remove outputs from notebooks/*.ipynb (they are committed without outputs)
	$(PY) scripts/strip_notebooks.py

clean: ## remove caches (keeps .venv and your runs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info .venv-ci mutants .mutation
