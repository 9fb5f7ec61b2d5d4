"""``App(engine=...)`` with typed payloads on PostgreSQL and MariaDB, through Apache Kafka.

The service's engine is a plain ``sqlalchemy.create_engine`` with one pooled
connection and session settings of its own. The framework's transactions on
it must run with the App's ``lock_timeout`` and ``idle_in_transaction_timeout``
(set for themselves only), the service's connection must come back with its
own settings, and ``App.run()`` must leave the engine undisposed and usable.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from exactlyonce import App, Message, _db, ids, migrate

from .helpers import (
    CONSUMER_CONFIG,
    create_effects,
    create_topic,
    effect_counts,
    headers_of,
    insert_effect,
    produce,
    read_topic,
    rec,
    unique,
    wait_all_committed,
)

SECRET = "sk_live_51HqQzSecretValue"


class Transfer(pydantic.BaseModel):
    transfer_id: str
    amount: int


def _settings(conn: Any, backend: str) -> tuple[str, ...]:
    if backend == "postgresql":
        return (conn.exec_driver_sql("SHOW lock_timeout").scalar_one(),
                conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar_one())
    row = conn.exec_driver_sql(
        "SELECT @@SESSION.innodb_lock_wait_timeout, @@SESSION.idle_transaction_timeout").one()
    return tuple(str(value) for value in row)


@pytest.fixture(params=["postgresql", "mariadb"])
def service_engine(request: pytest.FixtureRequest) -> Any:
    """The service's own engine: one connection, its own session settings (41 s lock wait)."""
    from tests.conftest import drop_all_tables

    backend = request.param
    url = request.getfixturevalue("postgres_url" if backend == "postgresql" else "mysql_url")
    drop_all_tables(url)
    engine = sa.create_engine(_db.normalize_url(url), pool_size=1, max_overflow=0, pool_timeout=20)

    @event.listens_for(engine, "connect")
    def _own_settings(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET lock_timeout = '41s'" if backend == "postgresql"
                       else "SET SESSION innodb_lock_wait_timeout = 41")
        cursor.close()
        dbapi_connection.commit()

    migrate.upgrade(engine)
    create_effects(engine)
    yield backend, engine
    engine.dispose()


def test_the_apps_timeouts_hold_in_its_transactions_only_and_the_engine_outlives_run(
    bootstrap_servers: str, service_engine: tuple[str, sa.Engine]
) -> None:
    backend, engine = service_engine
    disposed: list[Any] = []
    event.listen(engine, "engine_disposed", disposed.append)
    with engine.connect() as conn:
        before = _settings(conn, backend)
    assert before[0] in ("41s", "41")

    topic = unique("own-engine")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    app = App(unique("group"), bootstrap_servers=bootstrap_servers, engine=engine, consumer_config=CONSUMER_CONFIG,
              outbox=False, lock_timeout=timedelta(seconds=7), idle_in_transaction_timeout=timedelta(seconds=90))
    inside: list[tuple[str, ...]] = []

    # One record a transaction: a PostgreSQL transaction of several waits batch_lock_timeout instead
    # (test_lock_conflicts.py).
    @app.handler(topic, model=Transfer, message_id=ids.field("transfer_id"), batch_size=1)
    def handle(message: Message, session: Session) -> None:
        inside.append(_settings(session.connection(), backend))
        insert_effect(session, message.payload.transfer_id, str(message.payload.amount))

    produce(bootstrap_servers, topic, [
        rec(None, '{"transfer_id": "t1", "amount": 5}'),
        rec(None, '{"transfer_id": "t1", "amount": 5}'),        # re-sent: a duplicate by its payload's ID
        rec(None, f'{{"transfer_id": "t9", "amount": "{SECRET}"}}'),
        rec(None, '{"transfer_id": "t2", "amount": 7}'),
    ])
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run(app, errors), daemon=True)
    thread.start()
    try:
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    finally:
        app.stop()
        thread.join(30)
    assert not thread.is_alive() and not errors, errors

    assert effect_counts(engine) == {"t1": 1, "t2": 1}
    assert (app.stats["applied"], app.stats["duplicate"], app.stats["dead_lettered:invalid-payload"]) == (2, 1, 1)
    expected = ("7s", "90s") if backend == "postgresql" else ("7", "90")
    assert inside == [expected, expected]
    # The one pooled connection ran the framework's transactions and is the service's again, as it was.
    assert not disposed
    with engine.connect() as conn:
        assert _settings(conn, backend) == before
    (letter,) = read_topic(bootstrap_servers, f"{topic}.dlq")
    headers = headers_of(letter)
    assert headers["x-exactlyonce-reason"] == "invalid-payload"
    assert "amount" in headers["x-exactlyonce-error-message"]
    assert SECRET not in headers["x-exactlyonce-error-message"]


def _run(app: App, errors: list[BaseException]) -> None:
    try:
        app.run(install_signal_handlers=False)
    except BaseException as exc:
        errors.append(exc)


def test_a_lock_wait_in_the_apps_transaction_times_out_at_its_lock_timeout(
    service_engine: tuple[str, sa.Engine],
) -> None:
    """The per-transaction setting is the one that acts: a row held elsewhere fails the app's statement in ~1 s."""
    _, engine = service_engine
    app = App("g", engine=engine, lock_timeout=timedelta(seconds=1))
    holder = sa.create_engine(engine.url)
    try:
        with holder.begin() as conn:
            conn.execute(sa.text("INSERT INTO effects (message_id, payload, worker) VALUES ('held', '', '')"))
        with holder.connect() as other:
            other.begin()
            other.execute(sa.text("UPDATE effects SET payload = 'x' WHERE message_id = 'held'"))
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError) as caught, Session(app.engine) as session, session.begin():
                session.execute(sa.text("UPDATE effects SET payload = 'y' WHERE message_id = 'held'"))
            waited = time.monotonic() - started
            other.rollback()
        assert _db.is_transient(caught.value)
        assert 0.5 < waited < 10  # the service's own 41 s would still be waiting
    finally:
        holder.dispose()
