# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project (with its test and embedded-broker
# extras) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test unit lint bench clean

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

## The whole test suite (real broker, PostgreSQL, MariaDB, SQLite).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

## Tests that need no services.
unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
