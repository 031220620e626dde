# rnnlab: `make run` (set up, then the pipeline) and `make test` (set up, then the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PORT ?= 5000
# dvc.yaml's commands call `python -m rnnlab...`: make it the venv's python.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
STAMP := $(VENV)/.installed

.PHONY: install constraints espeak-ng run smoke quick test test-slow test-all bench bench-search lint ui clean help
.DEFAULT_GOAL := help

help:
	@echo "make run     set up, then the full pipeline (dvc repro, profile=default)"
	@echo "make quick   set up, then the whole pipeline on the quick profile, one seed (< 20 min)"
	@echo "make smoke   set up, then the whole pipeline on the smoke profile (minutes)"
	@echo "make test    set up, then the fast test suite"
	@echo "make test-slow  the slow tests: real processes, signals, worker pools, mlflow models serve"
	@echo "make bench   time rnnlab's GRU against torch.nn.GRU (reports/bench_gru.json)"
	@echo "make bench-search  trials per hour of a search, 1 worker against 2 (reports/search_bench.json)"
	@echo "make ui      MLflow UI over this project's runs on http://127.0.0.1:$(PORT)"
	@echo "make lint    ruff over src/ and tests/"

# constraints.txt pins every package to the tested version, so a fresh machine gets the set the tests passed with.
# Last, the cells' C++ loops are built into the venv (rnnlab.models.fused): a build that fails is reported in one line
# and leaves the cells on their Python loops; a change of fused_scan.cpp rebuilds them.
$(STAMP): pyproject.toml constraints.txt src/rnnlab/models/fused_scan.cpp
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,slurm]'
	$(BIN)/python -m rnnlab.models.fused build
	@touch $@

# After a change of pyproject.toml's dependencies: resolve them afresh, then pin what was installed.
constraints:
	rm -rf $(VENV)-fresh && $(PYTHON) -m venv $(VENV)-fresh
	$(VENV)-fresh/bin/python -m pip install --quiet --upgrade pip && $(VENV)-fresh/bin/python -m pip install --quiet -e '.[dev,slurm]'
	{ head -n 2 constraints.txt; $(VENV)-fresh/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(VENV)-fresh

install: espeak-ng $(STAMP)

# task=speech synthesises its clips with espeak-ng, a system package: installed here where
# that is possible (apt as root or password-less sudo), else a note says how.
espeak-ng:
	@if command -v espeak-ng >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng >/dev/null; \
	else \
		echo "note: espeak-ng is not installed and could not be installed here; task=speech needs it" \
		     "(Debian/Ubuntu: sudo apt-get install espeak-ng; macOS: brew install espeak-ng)."; \
	fi

run: install
	dvc repro
	@echo "comparison: reports/comparison.md"

# The smoke and quick profiles run as DVC experiments with one seed and no more_seeds (`dvc exp show` lists them);
# params.yaml is restored afterwards so the next `make run` is the default profile again. rnnlab.exp_run is
# `dvc exp run -S` without its second per stage (its docstring says why).
# The smoke profile checks the plumbing: two lags of the memory tasks' sweep are enough for that.
smoke: SWEEP := -S 'memory_lags=[5,10]'
smoke quick: install
	python -m rnnlab.exp_run -S profile=$@ -S 'seeds=[42]' -S 'more_seeds=[]' $(SWEEP)
	@echo "comparison: reports/comparison.md"

# One pytest-xdist worker per core (each with one torch thread: tests/conftest.py). The slow tests run one
# at a time: some start worker pools or time trials, and would measure each other.
test: install
	python -m pytest -m "not slow" -n auto

test-slow: install
	python -m pytest -m slow

test-all: test test-slow

bench: install
	python -m rnnlab.bench

bench-search: install
	python -m rnnlab.search_bench

lint: install
	ruff check src tests
	ruff format --check src tests

ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf logs .pytest_cache .ruff_cache
