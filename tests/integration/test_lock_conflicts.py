"""Lock conflicts: deadlocks inside handlers, hot rows shared by a group, and locks held by a paused worker.

A deadlock inside a sequenced handler's savepoint: InnoDB has already rolled
back the whole transaction, so the whole transaction must be retried, never
continued (issue 11, item 3).

Workers whose batches update the same few rows in random order: a batch lost
to a deadlock is retried in smaller transactions, so the group keeps making progress
(item 8).

A row lock held by a transaction that never ends: a claim waiting for it
fails as transient after the app's ``lock_timeout`` (item 9).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from exactlyonce import App, Claim, Message, Retry, claim, migrate
from exactlyonce.storage import engine as _db
from tests.conftest import drop_all_tables

from .helpers import (
    Rec,
    consumer_config_for,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    produce,
    rec,
    running,
    unique,
    wait_all_committed,
    wait_until,
)
from .sequence_effects import applied, insert_seq_effect, record, stream_and_number
from .sequence_effects import metadata as seq_metadata

pytestmark = pytest.mark.service

hot_metadata = sa.MetaData()
#: Rows two transactions lock in opposite orders to deadlock.
hot = sa.Table("hot", hot_metadata, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
               sa.Column("v", sa.Integer, nullable=False))
#: Rows the other transaction writes first, so that InnoDB (which rolls back
#: the transaction that did less) picks the handler's transaction as victim.
ballast = sa.Table("ballast", hot_metadata, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                   sa.Column("pad", sa.String(100), nullable=False))


def _bump(conn: Any, row: int) -> None:
    conn.execute(sa.update(hot).where(hot.c.id == row).values(v=hot.c.v + 1))


def _deadlock_in(session: Session, engine: sa.Engine) -> None:
    """Make ``session``'s transaction the victim of a real deadlock with another connection.

    This transaction locks row 1, the other row 2 (after writing ballast);
    this one then waits for row 2 and, a moment later, the other asks for row
    1. PostgreSQL aborts the waiter whose deadlock check runs first (this one,
    which waited first); InnoDB aborts the transaction that did less (this
    one). Raises the deadlock error this transaction got.
    """
    holds_row_2 = threading.Event()

    def other() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.insert(ballast), [{"pad": "x" * 100}] * 300)
            _bump(conn, 2)
            holds_row_2.set()
            time.sleep(0.3)
            _bump(conn, 1)

    _bump(session, 1)
    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    assert holds_row_2.wait(10)
    try:
        _bump(session, 2)
    finally:
        # The other transaction gets row 1 once this one rolls back (or
        # rolls back to its savepoint).
        thread.join(0 if session.get_bind().dialect.name == "postgresql" else 10)
    raise AssertionError("the forced deadlock did not happen: this transaction was not the victim")


def _raise_deadlock(session: Session, engine: sa.Engine) -> None:
    if session.get_bind().dialect.name == "sqlite":
        # SQLite has no deadlocks (writers queue on BEGIN IMMEDIATE): its
        # transient error instead, as the driver reports it.
        raise sa.exc.OperationalError("UPDATE hot", {}, sqlite3.OperationalError("database is locked"))
    _deadlock_in(session, engine)


@pytest.mark.parametrize("raised", ["as_is", "wrapped"])
def test_a_deadlock_inside_a_sequenced_handler_retries_the_whole_transaction(
    bootstrap_servers: str, database_url: str, raised: str
) -> None:
    """#2's handler loses a deadlock once: #1, #2, #3 are each applied once, in order, and #4 follows."""
    engine = engine_for(database_url)
    seq_metadata.create_all(engine)
    hot_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(hot), [{"id": 1, "v": 0}, {"id": 2, "v": 0}])
    topic = unique("seqdeadlock")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url, outbox=False)
    calls: list[int] = []
    deadlocks: list[BaseException] = []

    # One attempt when wrapped: a deadlock taken for a handler failure would
    # be dead-lettered at once instead of retried.
    @app.handler(topic, sequence=stream_and_number, retry=Retry(attempts=1 if raised == "wrapped" else 3))
    def handle(message: Message, session: Session) -> None:
        number = stream_and_number(message)[1]
        calls.append(number)
        insert_seq_effect(session, message)
        if number == 2 and not deadlocks:
            try:
                _raise_deadlock(session, engine)
            except sa.exc.OperationalError as exc:
                deadlocks.append(exc)
                if raised == "wrapped":
                    raise RuntimeError("could not update the hot rows") from exc
                raise

    produce(bootstrap_servers, topic, [record("a", 1), record("a", 2), record("a", 3)])
    with running(app):
        wait_until(lambda: applied(engine).get("a", []) == [1, 2, 3], 60, "#1 to #3 applied")
        produce(bootstrap_servers, topic, [record("a", 4)])
        wait_until(lambda: applied(engine).get("a", []) == [1, 2, 3, 4], 30, "#4 applied")
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert len(deadlocks) == 1, calls
    assert applied(engine) == {"a": [1, 2, 3, 4]}
    assert app.stats["dead_lettered"] == 0
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exactlyonce_parked")).scalar_one() == 0
    engine.dispose()


# -- hot rows -------------------------------------------------------------------

accounts_metadata = sa.MetaData()
accounts = sa.Table("accounts", accounts_metadata,
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("balance", sa.Integer, nullable=False))
#: One row per applied transfer; ``transfer_id`` is deliberately not unique.
transfers = sa.Table("transfers", accounts_metadata,
                     sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("transfer_id", sa.String(64), nullable=False))

HOT_ACCOUNTS = 5


@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"], ids=["postgresql", "mariadb"])
def test_workers_sharing_hot_rows_keep_making_progress(
    bootstrap_servers: str, server: str, request: pytest.FixtureRequest
) -> None:
    """Three workers, default batch size, every transfer moving money between two of five rows."""
    database: str = request.getfixturevalue(server)
    drop_all_tables(database)
    engine = engine_for(database)
    migrate.upgrade(engine)
    accounts_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(accounts), [{"id": i, "balance": 0} for i in range(HOT_ACCOUNTS)])
    topic, group = unique("hot"), unique("group")
    create_topic(bootstrap_servers, topic, partitions=6)
    rng = random.Random(5)
    records, expected = [], dict.fromkeys(range(HOT_ACCOUNTS), 0)
    for i in range(900):
        source, target = rng.sample(range(HOT_ACCOUNTS), 2)
        amount = rng.randrange(1, 100)
        expected[source] -= amount
        expected[target] += amount
        body = {"id": f"t-{i}", "from": source, "to": target, "amount": amount}
        records.append(Rec(value=json.dumps(body).encode(), message_id=f"t-{i}", partition=i % 6))
    produce(bootstrap_servers, topic, records)

    def worker() -> Any:
        app = make_app(bootstrap_servers, database, group=group, outbox=False)

        @app.handler(topic)
        def transfer(message: Message, session: Session) -> None:
            body = message.json()
            session.execute(sa.update(accounts).where(accounts.c.id == body["from"])
                            .values(balance=accounts.c.balance - body["amount"]))
            time.sleep(0.003)
            session.execute(sa.update(accounts).where(accounts.c.id == body["to"])
                            .values(balance=accounts.c.balance + body["amount"]))
            session.execute(sa.insert(transfers).values(transfer_id=body["id"]))

        return app

    apps = [worker() for _ in range(3)]
    with running(apps[0]), running(apps[1]), running(apps[2]):
        wait_all_committed(bootstrap_servers, group, topic, timeout=300)
    with engine.connect() as conn:
        counts = dict(conn.execute(sa.select(transfers.c.transfer_id, sa.func.count())
                                   .group_by(transfers.c.transfer_id)).all())
        balances = dict(conn.execute(sa.select(accounts.c.id, accounts.c.balance)).all())
    assert counts == {f"t-{i}": 1 for i in range(len(records))}
    assert balances == expected
    assert sum(app.stats["applied"] for app in apps) == len(records)
    engine.dispose()


def _driver_deadlock(session: Session) -> sa.exc.OperationalError:
    """The deadlock error as SQLAlchemy reports it for this session's database."""
    if session.get_bind().dialect.name == "postgresql":
        import psycopg

        return sa.exc.OperationalError("UPDATE accounts", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
    import pymysql

    return sa.exc.OperationalError("UPDATE accounts", {}, pymysql.err.OperationalError(1213, "Deadlock found"))


@pytest.mark.parametrize("sequenced", [False, True], ids=["by_id", "sequenced"])
@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"], ids=["postgresql", "mariadb"])
def test_a_batch_that_keeps_deadlocking_is_redone_smaller(
    bootstrap_servers: str, server: str, sequenced: bool, request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transaction that handles more than 8 records always deadlocks (it would touch every hot row).

    Retried at the same size, the default batch of 100 would deadlock for
    ever; cut to an eighth after each lost one (both kinds of handler), the
    transactions shrink until they pass.
    """
    database: str = request.getfixturevalue(server)
    drop_all_tables(database)
    engine = engine_for(database)
    migrate.upgrade(engine)
    seq_metadata.create_all(engine)
    topic = unique("smaller")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database, outbox=False)
    caplog.set_level(logging.WARNING, logger="exactlyonce")

    def handle(message: Message, session: Session) -> None:
        calls = session.info["calls"] = session.info.get("calls", 0) + 1
        if calls > 8:
            raise _driver_deadlock(session)
        insert_seq_effect(session, message)

    app.handler(topic, sequence=stream_and_number if sequenced else None,
                message_id=None if sequenced else lambda m: f"n-{stream_and_number(m)[1]}")(handle)
    produce(bootstrap_servers, topic, [record("a", n) for n in range(1, 201)])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic, timeout=90)
    assert applied(engine) == {"a": list(range(1, 201))}
    scope = app.handlers[topic].scope
    retries = app.metrics.registry.get_sample_value("exactlyonce_retries_total", {"scope": scope, "kind": "transient"})
    assert retries and retries >= 2
    assert any("retrying it in smaller transactions" in r.getMessage() for r in caplog.records)
    engine.dispose()


@pytest.mark.parametrize(("sequenced", "own_engine"), [(False, False), (True, False), (False, True)],
                         ids=["by_id", "sequenced", "by_id-own_engine"])
def test_a_transaction_of_several_records_waits_briefly_for_a_lock_then_goes_smaller(
    bootstrap_servers: str, postgres_url: str, sequenced: bool, own_engine: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: #6 needs a row another transaction holds; #1-#5 commit while it waits.

    The transaction of #1-#10 waits at most ``batch_lock_timeout`` for the
    row, is taken for a lost conflict and redone smaller, until #6 is alone:
    a single record waits ``lock_timeout`` (a minute here), as before. With
    the whole batch waiting a minute, #1-#5 would not commit within the
    test's wait. With ``own_engine`` the app works through a view of an
    engine whose connections have their own ``lock_timeout`` (41 s): its
    transactions set theirs locally, and the connections keep their own.
    """
    drop_all_tables(postgres_url)
    engine = engine_for(postgres_url)
    migrate.upgrade(engine)
    seq_metadata.create_all(engine)
    hot_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(hot), [{"id": 1, "v": 0}])
    topic = unique("briefwait")
    create_topic(bootstrap_servers, topic)
    timeouts = {"lock_timeout": timedelta(minutes=1), "batch_lock_timeout": timedelta(milliseconds=100)}
    service = sa.create_engine(_db.normalize_url(postgres_url))
    event.listen(service, "connect", _lock_timeout_41s)
    if own_engine:
        app = App(unique("group"), bootstrap_servers=bootstrap_servers, engine=service,
                  consumer_config=consumer_config_for("kafka-python"), outbox=False, **timeouts)
    else:
        app = make_app(bootstrap_servers, postgres_url, outbox=False, **timeouts)
    caplog.set_level(logging.WARNING, logger="exactlyonce")
    waits: dict[int, set[str]] = {}

    def handle(message: Message, session: Session) -> None:
        number = stream_and_number(message)[1]
        waits.setdefault(number, set()).add(session.execute(sa.text("SHOW lock_timeout")).scalar_one())
        insert_seq_effect(session, message)
        if number == 6:
            _bump(session, 1)

    app.handler(topic, sequence=stream_and_number if sequenced else None,
                message_id=None if sequenced else lambda m: f"n-{stream_and_number(m)[1]}")(handle)
    # All ten are on the topic before the worker's first poll, so that #6 is
    # first handled in a transaction with the others.
    produce(bootstrap_servers, topic, [record("a", n) for n in range(1, 11)])
    holder = engine.connect()
    try:
        holder.begin()
        _bump(holder, 1)
        with running(app):
            wait_until(lambda: applied(engine) == {"a": [1, 2, 3, 4, 5]}, 30, "#1-#5 applied while #6 waits")
            wait_until(lambda: "1min" in waits.get(6, set()), 30, "#6 waiting on its own, for lock_timeout")
            holder.rollback()
            wait_until(lambda: applied(engine) == {"a": list(range(1, 11))}, 60, "#6-#10 applied")
            wait_all_committed(bootstrap_servers, app.group_id, topic)
    finally:
        holder.close()
    assert "100ms" in waits[6], waits
    assert app.stats["applied"] == 10
    with service.connect() as conn:  # the service's own setting, on the connection the app used if it had one
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "41s"
    service.dispose()
    assert any("lost a lock conflict" in r.getMessage() and "canceling statement due to lock timeout" in
               r.getMessage() for r in caplog.records)
    engine.dispose()


def _lock_timeout_41s(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SET lock_timeout = '41s'")
    cursor.close()
    dbapi_connection.commit()


# -- a lock held without end ----------------------------------------------------------


def test_a_claim_blocked_by_a_held_row_lock_fails_as_transient_then_applies_once(
    bootstrap_servers: str, database_url: str
) -> None:
    """Another transaction holds the dedup row's lock: the claim times out and retries, then applies once."""
    engine = engine_for(database_url)
    create_effects(engine)
    topic = unique("held")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url, outbox=False, lock_timeout=timedelta(seconds=1))

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode())

    scope = app.handlers[topic].scope
    message = Message(topic=topic, partition=0, offset=1, key=None, value=b"v:m-1")

    def transient_retries() -> float:
        value = app.metrics.registry.get_sample_value("exactlyonce_retries_total",
                                                      {"scope": scope, "kind": "transient"})
        return value or 0.0

    with running(app):
        # The app is consuming (on SQLite every transaction, even the
        # runner's schema check, waits for the holder's write lock).
        produce(bootstrap_servers, topic, [rec("m-0")])
        wait_until(lambda: effect_counts(engine) == {"m-0": 1}, 60, "m-0 applied")
        holder = Session(engine)
        try:
            holder.begin()
            assert claim(holder, scope, "m-1", message) is Claim.NEW
            produce(bootstrap_servers, topic, [rec("m-1")])
            # Without a lock timeout the claim would wait for the holder forever
            # (PostgreSQL) or 50 s (InnoDB's default).
            wait_until(lambda: transient_retries() >= 2, 30, "the blocked claim to fail as transient, twice")
            if not database_url.startswith("sqlite"):  # (there, reading waits for the holder too)
                assert effect_counts(engine) == {"m-0": 1}
        finally:
            holder.rollback()
            holder.close()
        wait_until(lambda: effect_counts(engine) == {"m-0": 1, "m-1": 1}, 60, "m-1 applied")
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine, scope)] == [("m-0", "applied"), ("m-1", "applied")]
    assert effect_counts(engine) == {"m-0": 1, "m-1": 1}
    engine.dispose()


@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"], ids=["postgresql", "mariadb"])
def test_the_apps_connections_carry_its_timeouts(server: str, request: pytest.FixtureRequest) -> None:
    database: str = request.getfixturevalue(server)
    app = make_app("localhost:1", database, lock_timeout=timedelta(seconds=7),
                   idle_in_transaction_timeout=timedelta(seconds=90))
    with app.engine.connect() as conn:
        if server == "postgres_url":
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "7s"
            assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar_one() == "90s"
        else:
            row = conn.exec_driver_sql("SELECT @@innodb_lock_wait_timeout, @@idle_transaction_timeout").one()
            assert tuple(row) == (7, 90)
    app.engine.dispose()
