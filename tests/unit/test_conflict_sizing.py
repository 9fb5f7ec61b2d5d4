"""After a lock conflict, a handler's transactions shrink and grow back (runtime/dedup.py)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, Message
from exactlyonce.testing import TestApp

LIMIT = 8


def deadlock() -> sa.exc.OperationalError:
    """A deadlock as SQLAlchemy reports PostgreSQL's (SQLSTATE 40P01)."""
    return sa.exc.OperationalError("UPDATE accounts", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


def test_transactions_stay_near_the_size_that_passes_after_a_deadlock(tmp_path: Path) -> None:
    """A transaction of more than LIMIT records always deadlocks (it would touch every hot row).

    The first batch of 100 loses and is split; the later ones start from the
    size that passed and grow by an eighth at a time, so they never return to
    100 (which would lose again, each time waiting out a deadlock check).
    """
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False)
    sizes: list[int] = []
    applied: list[str] = []

    @app.handler("hot", batch=True, batch_size=100, message_id=lambda m: m.value.decode())
    def handle(messages: list[Message], session: Session) -> None:
        sizes.append(len(messages))
        if len(messages) > LIMIT:
            raise deadlock()
        applied.extend(m.value.decode() for m in messages)

    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in range(400):
            t.produce("hot", f"m-{n}".encode())
        outcomes = t.process()
    assert outcomes == ["applied"] * 400
    assert sorted(applied) == sorted(f"m-{n}" for n in range(400))
    first_pass = next(i for i, size in enumerate(sizes) if size <= LIMIT)
    assert max(sizes[first_pass:]) <= LIMIT + 1, sizes
    # It keeps probing upwards: not stuck at the size of the first success.
    assert sizes.count(LIMIT) > 1, sizes


def test_without_conflicts_a_handler_keeps_its_batch_size(tmp_path: Path) -> None:
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False)
    sizes: list[int] = []

    @app.handler("calm", batch=True, batch_size=50, message_id=lambda m: m.value.decode())
    def handle(messages: list[Message], session: Session) -> None:
        sizes.append(len(messages))

    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in range(200):
            t.produce("calm", f"m-{n}".encode())
        t.process()
    assert sizes == [50, 50, 50, 50]
