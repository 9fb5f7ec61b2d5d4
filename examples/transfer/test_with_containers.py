"""The transfer service end to end on Kafka and PostgreSQL in containers: a test file to copy.

NEEDS A DOCKER ENGINE. testcontainers starts a Kafka broker and a PostgreSQL
server (one of each for this module); without a Docker engine this module is
SKIPPED, the only tests of the suite allowed to skip for a missing service
(the machine that runs the project's CI has no Docker; the other tests fail
instead of skipping under ``CI=true``). Install what it needs with
``pip install 'exactlyonce[testing]'``.

The service runs as in production: ``app.run()`` (consumer, handler,
outbox relay) in a thread, started by the ``exactlyonce_worker`` fixture of
exactlyonce's pytest plugin, against the real broker and database. The test
sends transfers the way a client would (``exactlyonce.Producer``), one of
them twice, waits for the effects, and reads the published events back from
the broker.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

import exactlyonce
from exactlyonce.storage import migrate
from exactlyonce.testing import Worker, docker_available
from examples.transfer import service
from examples.transfer.models import accounts, create_engine, create_schema, transfers

pytestmark = pytest.mark.skipif(
    not docker_available(), reason="docker-only example: no Docker engine answers (testcontainers needs one)"
)


def container_module(name: str) -> Any:
    """``testcontainers.community.<name>`` (testcontainers 4.15 and later), else ``testcontainers.<name>``."""
    try:
        return importlib.import_module(f"testcontainers.community.{name}")
    except ImportError:
        return importlib.import_module(f"testcontainers.{name}")


@pytest.fixture(scope="module")
def kafka_bootstrap_servers() -> Iterator[str]:
    """A Kafka broker in a container, with the service's topics."""
    with container_module("kafka").KafkaContainer() as kafka:
        servers = kafka.get_bootstrap_server()
        admin = KafkaAdminClient(bootstrap_servers=servers)
        try:
            admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)
                                 for name in (service.TOPIC, service.APPLIED_TOPIC, f"{service.TOPIC}.dlq")])
        finally:
            admin.close()
        yield servers


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server in a container (``driver=None``: exactlyonce picks psycopg 3)."""
    with container_module("postgres").PostgresContainer("postgres:16-alpine", driver=None) as postgres:
        yield postgres.get_connection_url()


def test_transfers_are_applied_once_and_their_events_published(
    kafka_bootstrap_servers: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
    exactlyonce_worker: Callable[..., Worker],
) -> None:
    # The service's App reads these when it first needs them (App.run()).
    monkeypatch.setenv("EXACTLYONCE_BOOTSTRAP_SERVERS", kafka_bootstrap_servers)
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", postgres_url)
    engine = create_engine(postgres_url)
    try:
        migrate.upgrade(engine)  # exactlyonce's tables: `exactlyonce db upgrade`
        create_schema(engine)  # the service's own
        with engine.begin() as conn:
            conn.execute(sa.insert(accounts), [{"id": "acct-a", "balance": 100}, {"id": "acct-b", "balance": 0}])

        worker = exactlyonce_worker(service.app)  # app.run() in a thread, stopped when the test ends
        sent = [{"transfer_id": f"t{n}", "from": "acct-a", "to": "acct-b", "amount": 10} for n in range(5)]
        with exactlyonce.Producer(kafka_bootstrap_servers) as producer:
            for transfer in sent:
                producer.send(service.TOPIC, transfer, key=transfer["from"])
            producer.send(service.TOPIC, sent[0], key="another-key")  # a re-send, onto another partition maybe

        def recorded() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(transfers)).scalar_one())

        worker.wait_for(lambda: recorded() == len(sent))
        with engine.connect() as conn:
            balances = {row.id: row.balance for row in conn.execute(sa.select(accounts.c.id, accounts.c.balance))}
        assert balances == {"acct-a": 50, "acct-b": 50}

        # The worker's outbox relay sends two events per transfer to the broker.
        consumer = KafkaConsumer(service.APPLIED_TOPIC, bootstrap_servers=kafka_bootstrap_servers,
                                 auto_offset_reset="earliest", enable_auto_commit=False)
        events: list[dict[str, Any]] = []

        def all_events_read() -> bool:
            for batch in consumer.poll(timeout_ms=500).values():
                events.extend(json.loads(record.value) for record in batch)
            return len(events) >= 2 * len(sent)

        try:
            worker.wait_for(all_events_read)
        finally:
            consumer.close()
        # At least once: a relay that crashed would send some again (the ledger skips those copies).
        assert {(e["transfer_id"], e["direction"]) for e in events} == {
            (t["transfer_id"], side) for t in sent for side in ("debit", "credit")}
        assert service.app.stats["duplicate"] >= 1  # the re-sent transfer
    finally:
        engine.dispose()
