# evomerge: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-fitness lint setup clean

KERNELS := setup.py evomerge/merging/_kernels.c evomerge/merging/_kernels_body.h

$(STAMP): pyproject.toml $(KERNELS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

bench-fitness: $(STAMP)
	$(BIN)/python benchmarks/bench_fitness.py

lint: $(STAMP)
	$(BIN)/ruff check evomerge tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
