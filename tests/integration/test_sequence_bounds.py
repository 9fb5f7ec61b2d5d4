"""A long gap costs bounded transactions: releasing its parked records and giving them up.

A stream that waited long may have any number of records parked behind its
gap. Filling the gap releases them at most ``batch_size`` per transaction
(the rest in transactions of their own, continued by any worker after a
crash); ``on_gap="dead_letter"`` gives them up the same way. Run on SQLite,
PostgreSQL and MariaDB, with real Runners over the in-memory Kafka twins.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exactlyonce import App, Message, OnGap, Retry, _db, migrate
from exactlyonce.runtime import Runner
from exactlyonce.schema import counters, parked, processed, sequence_streams
from exactlyonce.testing import Cluster, Crash, TwinConsumer

TOPIC = "ledger"
DLQ = f"{TOPIC}.dlq"
GROUP = "bounds"
BATCH = 10

effects_metadata = sa.MetaData()
effects = sa.Table(
    "bounds_effects", effects_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(50), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'bounds.db'}"
    else:
        request.applymarker(pytest.mark.service)
        url = request.getfixturevalue("postgres_url" if request.param == "postgresql" else "mysql_url")
    engine = _db.create_engine(url)
    try:
        migrate.upgrade(engine)
        effects_metadata.drop_all(engine)
        effects_metadata.create_all(engine)
        with engine.begin() as conn:
            for table in (processed, counters, parked, sequence_streams):
                conn.execute(sa.delete(table))
    finally:
        engine.dispose()
    yield url


class Ledger:
    """An App with one sequenced handler, the twin cluster, and what each committed transaction did."""

    def __init__(self, url: str, **handler_options: Any) -> None:
        self.cluster = Cluster()
        self.cluster.create_topic(TOPIC)
        self.cluster.create_topic(DLQ)
        self.app = App(GROUP, bootstrap_servers="twin:9092", database_url=url, outbox=False,
                       transient_retry_budget=timedelta(0))
        #: Handler calls / dead letters published in the open transaction, and per committed one.
        self.calls = 0
        self.published = 0
        self.committed: list[tuple[int, int]] = []

        @self.app.handler(TOPIC, sequence=lambda m: (m.json()["s"], m.json()["n"]), batch_size=BATCH,
                          retry=Retry(attempts=1), **handler_options)
        def handle(message: Message, session: Any) -> None:
            data = message.json()
            self.calls += 1
            session.execute(sa.insert(effects).values(stream=data["s"], number=data["n"]))

        def on_append(record: Any) -> None:
            if record.topic == DLQ:
                self.published += 1

        def on_commit(conn: Any) -> None:
            if self.calls or self.published:
                self.committed.append((self.calls, self.published))
            self.calls = self.published = 0

        def on_rollback(conn: Any) -> None:
            self.calls = self.published = 0

        self.cluster.on_append = on_append
        sa.event.listen(self.app.engine, "commit", on_commit)
        sa.event.listen(self.app.engine, "rollback", on_rollback)

    def send(self, stream: str, number: int, payload: str = "") -> None:
        value = json.dumps({"s": stream, "n": number, "p": payload}).encode()
        self.cluster.append(TOPIC, 0, value=value)

    def run(self, runner: Runner | None = None, *, until: Any = None) -> Runner:
        """Run a worker until it has read everything, has no sequence work left and ``until()`` holds."""
        runner = runner or self.runner()
        stop = runner._stop
        deadline = time.monotonic() + 60

        def before_poll(member: TwinConsumer) -> bool:
            fake = member.fake
            read = fake.generation is not None and all(
                fake.positions.get(tp, 0) >= self.cluster.end_offset(tp) for tp in fake.assigned
            )
            if (read and not runner._ordered.more_work and (until is None or until())) \
                    or time.monotonic() > deadline:
                stop.set()
                return True
            return False

        self.cluster.before_poll = before_poll
        try:
            runner.run()
        finally:
            self.cluster.before_poll = None
        assert time.monotonic() <= deadline, "the worker did not finish within 60 s"
        return runner

    def runner(self) -> Runner:
        return Runner(self.app, threading.Event(), poll_timeout_s=0.01,
                      consumer_factory=self.cluster.consumer_factory(),
                      producer_factory=self.cluster.producer_factory())

    def effects(self) -> list[tuple[str, int]]:
        with self.app.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(  # type: ignore[misc]
                sa.select(effects.c.stream, effects.c.number).order_by(effects.c.id))]

    def streams(self) -> dict[str, tuple[int, int, Any]]:
        t = sequence_streams
        with self.app.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.stream, t.c.watermark, t.c.parked, t.c.gap_since))
            return {row.stream: (row.watermark, row.parked, row.gap_since) for row in rows}

    def parked_numbers(self) -> list[int]:
        with self.app.engine.connect() as conn:
            return list(conn.execute(sa.select(parked.c.number).order_by(parked.c.number)).scalars())

    def dead_letters(self) -> list[tuple[int, str]]:
        """(number, reason) of each record on the dead-letter topic."""
        out = []
        for record in self.cluster.records(DLQ):
            reason = dict(record.headers)["x-exactlyonce-reason"].decode()
            out.append((json.loads(record.value)["n"], reason))
        return out

    def close(self) -> None:
        self.app.engine.dispose()


def test_a_filled_gap_releases_its_parked_records_in_bounded_transactions(database_url: str) -> None:
    """100 parked behind a gap: filling it commits at most batch_size releases per transaction, in order."""
    ledger = Ledger(database_url)
    try:
        for number in range(2, 102):
            ledger.send("a", number)
        ledger.run()
        assert ledger.effects() == []
        assert ledger.streams()["a"][:2] == (0, 100)
        ledger.send("a", 1)
        ledger.run()
        assert ledger.effects() == [("a", n) for n in range(1, 102)]
        assert ledger.streams()["a"] == (101, 0, None)
        assert ledger.parked_numbers() == []
        calls = [c for c, _ in ledger.committed]
        # The gap filler and batch_size releases, then batch_size at a time.
        assert max(calls) == BATCH + 1
        assert calls == [BATCH + 1] + [BATCH] * 9
        assert ledger.cluster.records(DLQ) == []
    finally:
        ledger.close()


def test_a_release_cut_short_by_a_crash_is_continued_by_the_next_worker(database_url: str) -> None:
    """The worker dies after the gap-filling transaction: the next one finds the ready stream and goes on."""
    ledger = Ledger(database_url)
    try:
        for number in range(2, 32):
            ledger.send("a", number)
        ledger.send("b", 2)  # a stream with a real gap: never released
        ledger.run()
        ledger.send("a", 1)
        first = ledger.runner()

        def crash(handler: Any) -> bool:
            raise Crash("killed after the gap-filling transaction")

        first._ordered.release_ready = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            ledger.run(first)
        assert ledger.effects() == [("a", n) for n in range(1, BATCH + 2)]
        watermark, waiting, gap_since = ledger.streams()["a"]
        assert (watermark, waiting, gap_since) == (BATCH + 1, 30 - BATCH, None)  # ready, not a gap
        ledger.run()
        assert ledger.effects() == [("a", n) for n in range(1, 32)]
        assert ledger.streams()["a"] == (31, 0, None)
        b = ledger.streams()["b"]
        assert b[:2] == (0, 1) and b[2] is not None
        assert ledger.parked_numbers() == [2]
    finally:
        ledger.close()


def test_a_number_parked_by_a_cut_short_release_is_not_applied_twice(database_url: str) -> None:
    """While a release waits to be continued, a copy of its next number is a duplicate; another payload
    under it is a fingerprint mismatch; the parked original is the one applied."""
    ledger = Ledger(database_url)
    try:
        for number in range(2, 32):
            ledger.send("a", number)
        ledger.run()
        ledger.send("a", 1)
        first = ledger.runner()

        def crash(handler: Any) -> bool:
            raise Crash("killed after the gap-filling transaction")

        first._ordered.release_ready = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            ledger.run(first)
        following = BATCH + 2  # the next number, parked
        ledger.send("a", following, payload="forged")  # another payload: a mismatch
        ledger.send("a", following)  # the same payload: a duplicate
        ledger.run()
        assert ledger.effects() == [("a", n) for n in range(1, 32)]
        assert ledger.streams()["a"] == (31, 0, None)
        assert ledger.parked_numbers() == []
        assert ledger.dead_letters() == [(following, "fingerprint-mismatch")]
    finally:
        ledger.close()


def test_giving_up_a_long_gap_dead_letters_in_bounded_transactions(database_url: str) -> None:
    """on_gap="dead_letter" with 35 parked: each transaction publishes at most batch_size dead letters."""
    ledger = Ledger(database_url, on_gap=OnGap.DEAD_LETTER, gap_timeout=timedelta(milliseconds=1))
    try:
        for number in range(2, 37):
            ledger.send("a", number)
        ledger.run(until=lambda: len(ledger.cluster.records(DLQ)) >= 35)
        assert sorted(ledger.dead_letters()) == [(n, "sequence-gap") for n in range(2, 37)]
        published = [p for _, p in ledger.committed if p]
        assert published == [BATCH, BATCH, BATCH, 5]
        assert ledger.parked_numbers() == []
        assert ledger.streams()["a"] == (0, 0, None)
        assert ledger.effects() == []
        # The gap fills late: the number is applied; what was given up stays given up.
        ledger.send("a", 1)
        ledger.run()
        assert ledger.effects() == [("a", 1)]
    finally:
        ledger.close()
