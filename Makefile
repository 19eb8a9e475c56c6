# Two entry points for a fresh machine (see README): `make pipeline` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup pipeline test lint

# Virtualenv with this package (editable) and its dev tools; redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Set up, fetch the bundled sample from the in-repo DVC store (offline), rebuild the pipeline.
pipeline: $(STAMP)
	$(BIN)/dvc pull data.dvc
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/sam3ft summary

# Set up, lint, type-check, then the whole test suite (includes an end-to-end `dvc repro`): one
# worker per core, each test file on one worker (its module fixtures, e.g. the pipeline, run once).
test: $(STAMP) lint
	$(BIN)/dvc pull -q data.dvc
	$(BIN)/python -m pytest -q -n $(shell nproc) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
