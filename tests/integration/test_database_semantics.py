"""Behaviour that must be the same on every database (MariaDB once differed on both)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from exactlyonce import Claim, Message, Retry, _db, claim

from .helpers import (
    create_effects,
    create_topic,
    dedup_rows,
    engine_for,
    headers_of,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    total_effects,
    unique,
    wait_until,
)


def test_message_ids_differing_only_in_case_or_accents_are_distinct(
    database_url: str
) -> None:
    """Message IDs are compared byte for byte: 'order-1', 'Order-1' and 'ordér-1' are three messages."""
    engine = engine_for(database_url)
    message = Message(topic="t", partition=0, offset=0, key=None, value=b"v")
    with Session(engine) as session, session.begin():
        claims = [claim(session, "scope", mid, message) for mid in ("order-1", "Order-1", "ORDER-1", "ordér-1")]
    engine.dispose()
    assert claims == [Claim.NEW] * 4


def test_handler_sql_error_is_dead_lettered_not_retried_as_transient(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """A handler's SQL error (unknown column) is a handler failure: dead-lettered, not retried forever.

    For an async handler through the async driver too (asyncmy's errors carry the server's codes too).
    """
    topic = unique("sql-error")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url, transient_retry_budget=timedelta(seconds=1))

    bad = sa.text("INSERT INTO effects (message_id, worker, no_such_column) VALUES ('x', '', 1)")
    if handler_kind == "sync":
        @app.handler(topic, retry=Retry(attempts=1))
        def handle(message: Message, session: Session) -> None:
            session.execute(bad)
    else:
        @app.handler(topic, retry=Retry(attempts=1))
        async def handle_async(message: Message, session: AsyncSession) -> None:
            await session.execute(bad)

    produce(bootstrap_servers, topic, [rec("m-1")])
    with running(app):
        dead = wait_until(lambda: read_topic(bootstrap_servers, f"{topic}.dlq"), 15, "a dead letter")

    assert [headers_of(r)["x-exactlyonce-reason"] for r in dead] == ["handler-error"]
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [("m-1", "dead_lettered")]
    assert total_effects(engine) == 0
    engine.dispose()


def test_the_async_engine_has_the_same_settings_and_error_classes(database_url: str) -> None:
    """create_async_engine: the tested async driver, the same per-connection settings, a lock wait that is transient.

    PostgreSQL/MariaDB: the lock and idle timeouts are set on each connection;
    SQLite: WAL, and BEGIN IMMEDIATE (a transaction holds the write lock from
    its start). A lock wait past ``lock_timeout`` fails as a transient error.
    """
    engine = engine_for(database_url)
    create_effects(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO effects (message_id, worker) VALUES ('locked', '')"))
    async_engine = _db.create_async_engine(database_url, lock_timeout=timedelta(seconds=1),
                                           idle_in_transaction_timeout=timedelta(seconds=70))
    backend = engine.url.get_backend_name()
    found: dict[str, object] = {}

    def in_greenlet() -> None:
        sync = async_engine.sync_engine
        found["driver"] = sync.dialect.driver
        with sync.connect() as conn:
            if backend == "postgresql":
                found["settings"] = (conn.exec_driver_sql("SHOW lock_timeout").scalar(),
                                     conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar())
            elif backend == "mysql":
                found["settings"] = tuple(conn.exec_driver_sql(
                    "SELECT @@innodb_lock_wait_timeout, @@idle_transaction_timeout").one())
            else:
                found["settings"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        # A row (SQLite: the database) locked by another transaction: the wait ends as a transient error.
        with engine.connect() as holder, holder.begin():
            holder.execute(sa.text("UPDATE effects SET worker = 'holder' WHERE message_id = 'locked'"))
            try:
                with sync.begin() as conn:
                    conn.execute(sa.text("UPDATE effects SET worker = 'waiter' WHERE message_id = 'locked'"))
            except sa.exc.DBAPIError as exc:
                found["transient"] = _db.is_transient(exc)
                found["error"] = type(exc.orig).__module__

    async def main() -> None:
        try:
            await greenlet_spawn(in_greenlet)
        finally:
            await async_engine.dispose()

    asyncio.run(main())
    engine.dispose()
    expected = {"postgresql": ("psycopg", ("1s", "70s")), "mysql": ("asyncmy", (1, 70)),
                "sqlite": ("aiosqlite", "wal")}[backend]
    assert (found["driver"], found["settings"]) == expected
    assert found["transient"] is True, found
