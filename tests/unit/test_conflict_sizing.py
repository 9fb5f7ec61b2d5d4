"""After a lock conflict, a handler's transactions shrink and grow back (runtime/dedup.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, Message
from exactlyonce.runtime.dedup import CEILING_S, GROW_AFTER, SHRINK_BY, Dedup
from exactlyonce.testing import TestApp

LIMIT = 8


def deadlock() -> sa.exc.OperationalError:
    """A deadlock as SQLAlchemy reports PostgreSQL's (SQLSTATE 40P01)."""
    return sa.exc.OperationalError("UPDATE accounts", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


def test_transactions_stay_near_the_size_that_passes_after_a_deadlock(tmp_path: Path) -> None:
    """A transaction of more than LIMIT records always deadlocks (it would touch every hot row).

    The first batch of 100 loses and is redone in eighths; the later ones
    start from the size that passed and grow by an eighth at a time, only to
    below the smallest size that lost, so they never return to 100 (which
    would lose again, each time waiting out a deadlock check).
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
    # Probing upwards loses once more at most: then the lost size is out of reach.
    assert sum(size > LIMIT for size in sizes[first_pass:]) <= 1, sizes
    # It keeps growing: not stuck at the size of the first success.
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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sizing(clock: _Clock) -> Dedup:
    return Dedup(books=None, transient=None, dead_letters=None, calls=None, clock=clock)  # type: ignore[arg-type]


def _commit_at_size(dedup: Dedup, handler: Any, times: int) -> None:
    for _ in range(times):
        dedup._grow(handler, dedup.chunk_size(handler))


def test_a_conflict_cuts_the_size_to_an_eighth_and_the_lost_size_stays_out_of_reach() -> None:
    clock = _Clock()
    dedup = _sizing(clock)
    handler = SimpleNamespace(scope="s", batch_size=100)
    dedup._shrink(handler)
    assert dedup.chunk_size(handler) == 100 // SHRINK_BY == 12
    dedup._shrink(handler)
    assert dedup.chunk_size(handler) == 1
    # Growing: an eighth (at least one) per GROW_AFTER commits, only to below 12, the smallest size that lost.
    seen = []
    for _ in range(40):
        _commit_at_size(dedup, handler, GROW_AFTER)
        seen.append(dedup.chunk_size(handler))
    assert seen[:3] == [2, 3, 4]
    assert max(seen) == 11 and seen[-1] == 11
    # A commit short of the size (a partition's last records) does not count.
    dedup._grow(handler, 3)
    assert dedup._streaks["s"] == 0


def test_the_ceiling_lifts_after_a_quiet_while() -> None:
    clock = _Clock()
    dedup = _sizing(clock)
    handler = SimpleNamespace(scope="s", batch_size=40)
    dedup._shrink(handler)
    assert dedup.chunk_size(handler) == 5
    for _ in range(40):
        _commit_at_size(dedup, handler, GROW_AFTER)
    assert dedup.chunk_size(handler) == 39
    clock.now += CEILING_S
    _commit_at_size(dedup, handler, GROW_AFTER)
    assert dedup.chunk_size(handler) == 40
    assert "s" not in dedup._sizes and "s" not in dedup._ceilings


def test_a_later_conflict_keeps_the_smallest_lost_size_and_restarts_its_clock() -> None:
    clock = _Clock()
    dedup = _sizing(clock)
    handler = SimpleNamespace(scope="s", batch_size=100)
    dedup._shrink(handler)
    assert dedup._ceilings["s"] == (100, clock.now)
    clock.now += CEILING_S - 1
    dedup._shrink(handler)
    assert dedup._ceilings["s"] == (12, clock.now)
    assert dedup.chunk_size(handler) == 1
    clock.now += CEILING_S - 1  # 2 * CEILING_S - 2 after the first conflict: the second one's clock holds
    for _ in range(30):
        _commit_at_size(dedup, handler, GROW_AFTER)
    assert dedup.chunk_size(handler) == 11


def test_a_poll_tail_that_loses_a_conflict_does_not_cut_the_size_to_one(tmp_path: Path) -> None:
    """The last 5 records of a poll lose a chance deadlock: the next transactions are an eighth of 100, not 1."""
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False,
              consumer_config={"max_poll_records": 105})
    sizes: list[int] = []
    lost: list[int] = []

    @app.handler("calm", batch=True, batch_size=100, message_id=lambda m: m.value.decode())
    def handle(messages: list[Message], session: Session) -> None:
        sizes.append(len(messages))
        if len(messages) == 5 and not lost:
            lost.append(len(messages))
            raise deadlock()

    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in range(130):
            t.produce("calm", f"m-{n}".encode())
        assert t.process() == ["applied"] * 130
    # The first poll: 100, then its last 5 lose and are redone; the second poll: 25 in 12s.
    assert sizes == [100, 5, 5, 12, 12, 1]
