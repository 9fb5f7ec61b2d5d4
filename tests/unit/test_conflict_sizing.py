"""After a lock conflict, a handler's transactions shrink and grow back (runtime/sizing.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, Message, Retry
from exactlyonce.runtime.sizing import CEILING_S, GROW_AFTER, SHRINK_BY, ConflictSizing
from exactlyonce.testing import TestApp

LIMIT = 8


def deadlock() -> sa.exc.OperationalError:
    """A deadlock as SQLAlchemy reports PostgreSQL's (SQLSTATE 40P01)."""
    return sa.exc.OperationalError("UPDATE accounts", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


def test_after_two_deadlocks_transactions_stay_small(tmp_path: Path) -> None:
    """A transaction of more than LIMIT records always deadlocks (it would touch every hot row).

    The first batch of 100 loses and is redone in eighths (12); those lose
    too, and the size is cut to 1 and held there (the run is much shorter
    than CEILING_S): no transaction ever probes the sizes that lost again,
    each of which would wait out a deadlock check.
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
    assert sizes[:3] == [100, 12, 1], sizes
    assert set(sizes[2:]) == {1}, sizes


def test_a_sequenced_handler_shrinks_the_same_way_and_keeps_each_streams_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """As above, for a sequenced handler: the batch that lost is not retried whole, and numbers stay in order.

    Before, a sequenced batch was retried whole twice and then in halves,
    each retry meeting the same rows again (3 losses at 100, 3 at 50, ...).
    """
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False)
    applied: list[tuple[str, int]] = []

    def stream_and_number(message: Message) -> tuple[str, int]:
        stream, number = message.value.decode().split("-")
        return stream, int(number)

    @app.handler("hot", batch_size=100, sequence=stream_and_number)
    def handle(message: Message, session: Session) -> None:
        session.info["records"] = session.info.get("records", 0) + 1
        if session.info["records"] > LIMIT:
            raise deadlock()
        applied.append(stream_and_number(message))

    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in range(1, 201):
            t.produce("hot", f"{'ab'[n % 2]}-{(n + 1) // 2}".encode())
        outcomes = t.process()
    assert outcomes == ["applied"] * 200
    lost = [r.getMessage().split()[3] for r in caplog.records if "lost a lock conflict" in r.getMessage()]
    assert lost == ["100", "12"], lost
    # Each record applied once (the handler's own list counts rolled-back calls too: keep the last of each).
    for stream in "ab":
        numbers = [n for s, n in applied if s == stream]
        assert sorted(set(numbers)) == list(range(1, 101))
        assert numbers[-100:] == list(range(1, 101))


def test_a_sequenced_handler_grows_back_and_applies_parked_records_once_in_order(tmp_path: Path) -> None:
    """One lost batch, then none: the size grows back; records parked across pieces are each applied once, in order.

    Each stream's numbers arrive in swapped pairs (2, 1, 4, 3, ...), so every
    second record is parked and released by the next, sometimes in the next
    piece. The handler writes each record it applies to a table: what
    committed is what is there, in insertion order.
    """
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False)
    done = sa.Table("done", sa.MetaData(), sa.Column("stream", sa.Text), sa.Column("number", sa.Integer))
    applied_per_txn: list[int] = []
    lost: list[int] = []

    def stream_and_number(message: Message) -> tuple[str, int]:
        stream, number = message.value.decode().split("-")
        return stream, int(number)

    @app.handler("t", batch_size=100, sequence=stream_and_number)
    def handle(message: Message, session: Session) -> None:
        calls = session.info["records"] = session.info.get("records", 0) + 1
        if calls > LIMIT and not lost:
            lost.append(calls)
            raise deadlock()
        if calls == 1:
            applied_per_txn.append(0)
        applied_per_txn[-1] = calls
        session.execute(sa.insert(done), dict(zip(("stream", "number"), stream_and_number(message), strict=True)))

    url = f"sqlite:///{tmp_path}/t.db"
    engine = sa.create_engine(url)
    done.metadata.create_all(engine)
    with TestApp(app, database_url=url) as t:
        for n in range(1, 601):
            pair, second = divmod(n - 1, 2)
            t.produce("t", f"{'ab'[pair % 2]}-{(pair // 2) * 2 + 2 - second}".encode())
        t.process()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(done.c.stream, done.c.number).order_by(sa.text("rowid"))).all()
    for stream in "ab":
        assert [n for s, n in rows if s == stream] == list(range(1, 301))
    assert len(lost) == 1
    # Records applied per transaction: the lost one's 8, then about 12 (12 polled, parked ones
    # released with them), growing by an eighth every 8 commits.
    assert applied_per_txn[0] == LIMIT
    assert max(applied_per_txn[1:9]) <= 13 and max(applied_per_txn[-8:]) >= 15, applied_per_txn
    engine.dispose()


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


def _commit_at_size(sizing: ConflictSizing, handler: Any, times: int) -> None:
    for _ in range(times):
        sizing.committed(handler, sizing.size(handler))


def test_after_one_conflict_the_size_grows_back_to_below_the_size_that_lost() -> None:
    clock = _Clock()
    sizing = ConflictSizing(clock)
    handler = SimpleNamespace(scope="s", batch_size=100)
    sizing.lost(handler)
    assert sizing.size(handler) == 100 // SHRINK_BY == 12
    # Growing: an eighth (at least one) per GROW_AFTER commits, only to below 100, the size that lost.
    seen = []
    for _ in range(40):
        _commit_at_size(sizing, handler, GROW_AFTER)
        seen.append(sizing.size(handler))
    assert seen[:3] == [13, 14, 15]
    assert max(seen) == 99 and seen[-1] == 99
    # A commit short of the size (a partition's last records) does not count.
    sizing.committed(handler, 3)
    assert sizing._streaks["s"] == 0
    # Once the conflict is CEILING_S old, back to batch_size.
    clock.now += CEILING_S
    _commit_at_size(sizing, handler, GROW_AFTER)
    assert sizing.size(handler) == 100
    assert "s" not in sizing._sizes and "s" not in sizing._conflicts


def test_a_second_conflict_within_the_window_holds_the_size_until_it_passes() -> None:
    clock = _Clock()
    sizing = ConflictSizing(clock)
    handler = SimpleNamespace(scope="s", batch_size=100)
    sizing.lost(handler)
    clock.now += CEILING_S - 1
    sizing.lost(handler)
    assert sizing.size(handler) == 1
    assert sizing._conflicts["s"] == (12, clock.now, 2)
    clock.now += CEILING_S - 1  # the second conflict's clock holds, not the first's
    for _ in range(30):
        _commit_at_size(sizing, handler, GROW_AFTER)
    assert sizing.size(handler) == 1
    clock.now += 1
    seen = []
    for _ in range(60):
        _commit_at_size(sizing, handler, GROW_AFTER)
        seen.append(sizing.size(handler))
    assert seen[:3] == [2, 3, 4] and seen[-1] == 100
    # A conflict long after the last one counts as a first one again.
    sizing.lost(handler)
    assert sizing._conflicts["s"] == (100, clock.now, 1)


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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sequenced", [False, True], ids=["by_id", "sequenced"])
def test_a_handler_failure_after_a_lost_conflict_gets_its_retry_policy(
    tmp_path: Path, sequenced: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch loses a deadlock and is redone; #5 then fails in the redone transaction: its own error.

    Raised while the lost batch's error was being handled, #5's ValueError
    would carry it as its ``__context__`` and be taken for a transient
    failure: retried for the transient budget and rewound, again and again,
    instead of getting its Retry policy and a dead letter.
    """
    app = App("g", bootstrap_servers="unused:9092", database_url="sqlite://", outbox=False)
    losses = 1
    lost: list[int] = []

    def number(message: Message) -> int:
        return int(message.value.decode().split("-")[1])

    def handle(message: Message, session: Session) -> None:
        session.info["records"] = session.info.get("records", 0) + 1
        if session.info["records"] > 1 and len(lost) < losses:
            lost.append(number(message))
            raise deadlock()
        if number(message) == 5:
            raise ValueError("a poison record")

    app.handler("t", retry=Retry(attempts=2, backoff=timedelta(0)),
                sequence=(lambda m: ("s", number(m))) if sequenced else None,
                message_id=None if sequenced else (lambda m: m.value.decode()))(handle)
    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in range(1, 11):
            t.produce("t", f"m-{n}".encode())
        outcomes = t.process()
    assert len(lost) == losses
    assert outcomes == ["applied"] * 4 + ["dead_lettered"] + ["applied"] * 5
    # Dead-lettered in the poll it came in: never a lost conflict, never rewound.
    taken_for_transient = [r.getMessage() for r in caplog.records if "poison" in r.getMessage()
                           and ("lock conflict" in r.getMessage() or "rewinding" in r.getMessage())]
    assert not taken_for_transient
    assert t.stats["dead_lettered:handler-error"] == 1, t.stats
