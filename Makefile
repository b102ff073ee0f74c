# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
# Override for another build, e.g. `make test TORCH="torch==2.13.0 --index-url <a CUDA wheel index>"`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.normkit-run
DEV_STAMP := $(VENV)/.normkit-dev
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e ".[dev]"
	touch $@

demo: $(RUN_STAMP)
	$(BIN)/normkit demo

test: $(DEV_STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_batchnorm.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .hypothesis
