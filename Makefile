# psr: make help
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# auto: `make test` brings the loopback Slurm cluster up for tests/slurm and stops it after (if it
# started it); off: pytest alone (a machine without root or apt; add PYTEST_ARGS='-m "not slurm"')
SLURM ?= auto
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo test test-all lint format typecheck bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## create .venv/ with psr and everything the tests need (CPU; ~3 min)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[deepspeed]"

demo:  ## the embedded tiny default end to end on CPU: psr-data -> psr-sft -> psr-rl -> psr-eval (~1 min)
	bash scripts/quickstart.sh runs/quickstart

test:  ## the test suite (CPU; what CI runs); starts the loopback Slurm cluster if needed and stops it after
ifeq ($(SLURM),off)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
else
	bash scripts/slurm_local.sh with $(BIN)/python -m pytest -q $(PYTEST_ARGS)
endif

lint:  ## ruff lint + format check
	$(BIN)/ruff check psr rewards data_pipeline tests benchmarks scripts
	$(BIN)/ruff format --check psr rewards data_pipeline tests benchmarks scripts

format:  ## ruff fix + format
	$(BIN)/ruff check --fix psr rewards data_pipeline tests benchmarks scripts
	$(BIN)/ruff format psr rewards data_pipeline tests benchmarks scripts

typecheck:  ## mypy
	$(BIN)/mypy psr rewards data_pipeline

bench:  ## print the benchmark tables (tiny models on CPU; FLUX-size with --flux-size on a GPU)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove run outputs and caches
	rm -rf runs outputs multirun .pytest_cache .mypy_cache .ruff_cache

.PHONY: slurm-up slurm-down
slurm-up:  ## install (apt) and start the one-node Slurm cluster on loopback and leave it running (root)
	bash scripts/slurm_local.sh install
	bash scripts/slurm_local.sh start

slurm-down:  ## stop the local Slurm cluster
	bash scripts/slurm_local.sh stop
