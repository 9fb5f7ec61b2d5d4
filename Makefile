# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project (with its test and embedded-broker
# extras) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-compose test unit model smoke-tansu services kafka chaos cluster-chaos lint docs bench clean

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

## The whole test suite: Apache Kafka (one node, and a three-node cluster for
## the failover tests), PostgreSQL, MariaDB, SQLite. Missing services are set
## up by the tests themselves (see `services`); EXACTLYONCE_TEST_BROKER=tansu
## runs it on the embedded broker instead.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

## Tests that need no services.
unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

## A longer run of the model-based test (tests/model.py) on SQLite, PostgreSQL and
## MariaDB, with random seeds: make model MODEL_EXAMPLES=500 MODEL_STEPS=50
MODEL_EXAMPLES ?= 500
MODEL_STEPS ?= 50
model: $(STAMP)
	MODEL_EXAMPLES=$(MODEL_EXAMPLES) MODEL_STEPS=$(MODEL_STEPS) $(BIN)/python -m pytest -q -ra -p no:cacheprovider --timeout=3600 \
		tests/unit/test_model.py tests/integration/test_model_databases.py

## A smoke set on the embedded broker (tansu): the zero-setup path keeps working.
SMOKE_TESTS := tests/integration/test_dedup.py tests/integration/test_crash_redelivery.py \
	tests/integration/test_rebalance.py tests/integration/test_example_ledger.py
smoke-tansu: $(STAMP)
	EXACTLYONCE_TEST_BROKER=tansu $(BIN)/python -m pytest -q -ra $(SMOKE_TESTS)

## Install (Debian/Ubuntu, as root) and start PostgreSQL and MariaDB for the
## tests, idempotently; also fetch Apache Kafka's jars from Maven Central.
services: kafka
	bash tests/services/databases.sh

## Fetch Apache Kafka's broker jars (Maven Central, cached in ~/.cache/exactlyonce).
kafka: $(STAMP)
	$(BIN)/python -m tests.services.kafka --fetch-only

## A longer run of the chaos bank test: make chaos DURATION=600 SEED=7
## (ASYNC=1: with an async def transfer handler)
DURATION ?= 600
SEED ?= 1
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.bank --duration $(DURATION) --seed $(SEED) $(if $(ASYNC),--async-handler)

## The same on a three-node Apache Kafka cluster, with leaders, the group
## coordinator and the whole cluster killed too: make cluster-chaos DURATION=600
cluster-chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.bank --cluster --duration $(DURATION) --seed $(SEED)

## The benchmarks (about 20 minutes; QUICK=1 for a smoke run; BROKER=kafka|tansu); writes bench/results.md
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(if $(QUICK),--quick) $(if $(BROKER),--broker $(BROKER))

## The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken
## link or an unresolved API reference fails the build.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis site
