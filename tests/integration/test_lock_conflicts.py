"""Lock conflicts: deadlocks inside handlers.

A deadlock inside a sequenced handler's savepoint: InnoDB has already rolled
back the whole transaction, so the whole transaction must be retried, never
continued (issue 11, item 3).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Message, Retry

from .helpers import (
    create_topic,
    engine_for,
    make_app,
    produce,
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
