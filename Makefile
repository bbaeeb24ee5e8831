# Set-up is two commands: `make demo` (the main job) and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint bench-engine bench-batching clean

$(BIN)/pyagent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $@

demo: $(BIN)/pyagent
	$(BIN)/pyagent demo

lint: $(BIN)/pyagent
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/pytest

test-fast: lint
	$(BIN)/pytest -m "not model"

bench-engine: $(BIN)/pyagent
	$(BIN)/python benchmarks/engine.py

bench-batching: $(BIN)/pyagent
	$(BIN)/python benchmarks/batching.py

clean:
	rm -rf $(VENV) .pytest_cache
