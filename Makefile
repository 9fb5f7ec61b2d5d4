# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project (with its test and embedded-broker
# extras) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-compose test unit chaos lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.venv: $(STAMP)

## Run the money-transfer example end to end (embedded broker + SQLite unless
## EXACTLYONCE_BOOTSTRAP_SERVERS / EXACTLYONCE_DATABASE_URL are set).
demo: $(STAMP)
	$(BIN)/python -m examples.transfer.demo

## The same example on Apache Kafka and PostgreSQL in containers (needs Docker).
demo-compose:
	docker compose up --build

## The whole test suite (real broker, PostgreSQL, MariaDB, SQLite).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

## Tests that need no services.
unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

## A longer run of the chaos bank test: make chaos DURATION=600 SEED=7
DURATION ?= 600
SEED ?= 1
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.bank --duration $(DURATION) --seed $(SEED)

## The benchmarks (about 20 minutes; QUICK=1 for a smoke run); writes bench/results.md
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
