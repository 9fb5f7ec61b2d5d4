"""Sequenced handlers: each stream's numbers applied exactly once, in order.

The records of a stream arrive shuffled, duplicated and spread over several
partitions; the handler must still see 1, 2, 3, ... once each.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import Message, Retry, migrate
from exactlyonce.schema import counters, parked, sequence_streams
from tests.conftest import drop_all_tables

from .helpers import (
    Rec,
    as_kind,
    create_topic,
    dedup_rows,
    engine_for,
    headers_of,
    make_app,
    process,
    produce,
    read_topic,
    running,
    unique,
    wait_until,
)
from .sequence_effects import (
    applied,
    insert_seq_effect,
    insert_seq_effect_async,
    metadata,
    record,
    scrambled,
    stream_and_number,
)

pytestmark = pytest.mark.service


def _streams_table(engine: sa.Engine, scope: str) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(sequence_streams.c.stream, sequence_streams.c.watermark, sequence_streams.c.parked)
            .where(sequence_streams.c.scope == scope)
        ).all()
    return {stream: (watermark, n_parked) for stream, watermark, n_parked in rows}


def _parked_numbers(engine: sa.Engine, scope: str) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(parked.c.stream, parked.c.number).where(parked.c.scope == scope).order_by(parked.c.number)
        ).all()
    return [(stream, number) for stream, number in rows]


def _counter_sums(engine: sa.Engine, scope: str) -> dict[str, int]:
    columns = ("applied", "duplicates", "parked", "dead_lettered")
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(*(sa.func.coalesce(sa.func.sum(counters.c[c]), 0) for c in columns))
            .where(counters.c.scope == scope)
        ).one()
    return dict(zip(columns, (int(v) for v in row), strict=True))


def _sequenced_app(bootstrap: str, database_url: str, topic: str, kind: str, **kwargs: Any) -> Any:
    app = make_app(bootstrap, database_url, outbox=False)
    if kind == "sync":
        @app.handler(topic, sequence=stream_and_number, **kwargs)
        def handle(message: Message, session: Session) -> None:
            insert_seq_effect(session, message)
    else:
        @app.handler(topic, sequence=stream_and_number, **kwargs)
        async def handle_async(message: Message, session: AsyncSession) -> None:
            await insert_seq_effect_async(session, message)
    return app


def test_shuffled_duplicated_cross_partition_streams_apply_in_order_once(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    engine = engine_for(database_url)
    metadata.create_all(engine)
    topic = unique("seq")
    create_topic(bootstrap_servers, topic, partitions=3)
    counts = {f"acct-{i}": 15 + i for i in range(5)}
    records = scrambled(counts, partitions=3, rng=random.Random(7))
    produce(bootstrap_servers, topic, records)
    app = _sequenced_app(bootstrap_servers, database_url, topic, handler_kind, batch_size=7)
    scope = app.handlers[topic].scope

    with running(app):
        wait_until(lambda: {s: len(ns) for s, ns in applied(engine).items()} == counts, 60, "every number applied")

    assert applied(engine) == {stream: list(range(1, n + 1)) for stream, n in counts.items()}
    assert _streams_table(engine, scope) == {stream: (n, 0) for stream, n in counts.items()}
    assert _parked_numbers(engine, scope) == []
    # One row per stream, none per message.
    assert dedup_rows(engine, scope) == []
    sums = _counter_sums(engine, scope)
    total = sum(counts.values())
    assert sums["applied"] == total
    assert sums["duplicates"] == len(records) - total
    assert sums["parked"] > 0  # the shuffle put some numbers ahead of their turn
    assert app.stats["parked"] == sums["parked"]


@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"], ids=["postgresql", "mariadb"])
def test_several_workers_killed_and_replaced_keep_every_stream_in_order(
    bootstrap_servers: str, server: str, handler_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # MariaDB runs at REPEATABLE READ: the parked rows must be read with
    # locking reads there, or a worker could miss a row parked by another.
    database: str = request.getfixturevalue(server)
    drop_all_tables(database)
    engine = engine_for(database)
    migrate.upgrade(engine)
    metadata.create_all(engine)
    topic, group = unique("seqk"), unique("group")
    create_topic(bootstrap_servers, topic, partitions=3)
    counts = {f"s{i}": 40 for i in range(8)}
    records = scrambled(counts, partitions=3, rng=random.Random(11))
    total = sum(counts.values())

    def argv(name: str) -> list[str]:
        return [sys.executable, "-m", "tests.integration.sequence_worker", "--bootstrap", bootstrap_servers,
                "--database-url", database, "--topic", topic, "--group", group, "--name", name,
                *(["--async"] if handler_kind == "async" else [])]

    def applied_count() -> int:
        return sum(len(ns) for ns in applied(engine).values())

    sender = threading.Thread(target=produce, args=(bootstrap_servers, topic, records), daemon=True)
    with process(argv("w1"), tmp_path / "w1.log") as w1, process(argv("w2"), tmp_path / "w2.log") as w2:
        sender.start()
        wait_until(lambda: applied_count() >= total // 4, 90, "a quarter applied")
        w1.popen.kill()
        with process(argv("w3"), tmp_path / "w3.log") as w3:
            wait_until(lambda: applied_count() >= total // 2, 90, "half applied")
            w2.popen.kill()
            with process(argv("w4"), tmp_path / "w4.log") as w4:
                sender.join(120)
                wait_until(lambda: applied_count() >= total, 120, "everything applied")
                # SIGTERM stops a worker cleanly once it runs (before that it would just die).
                for worker in (w3, w4):
                    wait_until(lambda w=worker: "consuming" in w.log_tail(), 30, "the worker running")
                assert w3.terminate() == 0, w3.log_tail()
                assert w4.terminate() == 0, w4.log_tail()

    by_stream = applied(engine)
    assert by_stream == {stream: list(range(1, n + 1)) for stream, n in counts.items()}
    scope = f"{group}:{topic}"
    assert _streams_table(engine, scope) == {stream: (n, 0) for stream, n in counts.items()}
    assert _parked_numbers(engine, scope) == []


def _dlq(bootstrap: str, topic: str, expected: int) -> list[Any]:
    return wait_until(lambda: (lambda r: r if len(r) >= expected else None)(read_topic(bootstrap, topic, 5)), 60,
                      f"{expected} dead letters on {topic}")


def _scope_gauge(app: Any, name: str, scope: str) -> float | None:
    value = app.metrics.registry.get_sample_value(name, {"scope": scope})
    return None if value is None else float(value)


def test_a_gap_is_reported_and_waited_for_until_it_fills(
    bootstrap_servers: str, database_url: str, handler_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_for(database_url)
    metadata.create_all(engine)
    topic = unique("gapwait")
    create_topic(bootstrap_servers, topic)
    app = _sequenced_app(bootstrap_servers, database_url, topic, handler_kind, gap_timeout=timedelta(seconds=1))
    scope = app.handlers[topic].scope
    caplog.set_level(logging.WARNING, logger="exactlyonce")
    with running(app):
        produce(bootstrap_servers, topic, [record("a", 1), record("a", 3), record("a", 4)])
        wait_until(lambda: _parked_numbers(engine, scope) == [("a", 3), ("a", 4)], 30, "3 and 4 parked")
        assert applied(engine) == {"a": [1]}
        wait_until(lambda: _scope_gauge(app, "exactlyonce_sequence_open_gaps", scope) == 1, 30, "the gap metric")
        wait_until(lambda: any("'a' has waited for number 2" in r.getMessage() for r in caplog.records), 10,
                   "the gap warning")
        produce(bootstrap_servers, topic, [record("a", 2)])
        wait_until(lambda: applied(engine) == {"a": [1, 2, 3, 4]}, 30, "the gap filled")
        wait_until(lambda: _scope_gauge(app, "exactlyonce_sequence_open_gaps", scope) == 0, 30, "gap metric 0")
    assert _streams_table(engine, scope) == {"a": (4, 0)}
    assert _parked_numbers(engine, scope) == []


def test_dead_letter_gap_policy_sends_the_parked_messages_to_the_dlq(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    engine = engine_for(database_url)
    metadata.create_all(engine)
    topic = unique("gapdlq")
    create_topic(bootstrap_servers, topic)
    app = _sequenced_app(bootstrap_servers, database_url, topic, handler_kind, gap_timeout=timedelta(seconds=1),
                         on_gap="dead_letter")
    scope = app.handlers[topic].scope
    with running(app):
        produce(bootstrap_servers, topic, [record("a", 1), record("a", 3), record("a", 4)])
        letters = _dlq(bootstrap_servers, f"{topic}.dlq", 2)
        assert [headers_of(r)["x-exactlyonce-reason"] for r in letters] == ["sequence-gap", "sequence-gap"]
        assert sorted(stream_and_number(_as_message(r))[1] for r in letters) == [3, 4]
        wait_until(lambda: _parked_numbers(engine, scope) == [], 10, "parked rows gone")
        # The stream still waits for 2; when it comes, it is applied, and the
        # dead-lettered 3 and 4, sent again (a replay), follow in order.
        produce(bootstrap_servers, topic, [record("a", 2), record("a", 4), record("a", 3)])
        wait_until(lambda: applied(engine) == {"a": [1, 2, 3, 4]}, 30, "the stream complete")
    assert _streams_table(engine, scope) == {"a": (4, 0)}
    assert _counter_sums(engine, scope)["dead_lettered"] == 2


def _as_message(record: Any) -> Message:
    return Message(topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                   value=record.value, headers=tuple(record.headers or ()))


def test_bad_sequences_and_failing_handlers_are_dead_lettered_and_the_stream_moves_on(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    engine = engine_for(database_url)
    metadata.create_all(engine)
    topic = unique("seqbad")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url, outbox=False)
    scope = f"{app.group_id}:{topic}"

    @app.handler(topic, sequence=stream_and_number, retry=Retry(attempts=2, backoff=timedelta(0)))
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        insert_seq_effect(session, message)
        if stream_and_number(message)[1] == 2:
            raise ValueError("number 2 always fails")

    with running(app):
        produce(bootstrap_servers, topic, [
            Rec(value=b'{"stream": "x", "n": 0}'),
            Rec(value=b"not json"),
            Rec(value=b'{"stream": "", "n": 1}'),
            record("x", 3), record("x", 2), record("x", 1),
        ])
        letters = _dlq(bootstrap_servers, f"{topic}.dlq", 4)
        wait_until(lambda: applied(engine) == {"x": [1, 3]}, 30, "1 and 3 applied, 2 dead-lettered")
    reasons = sorted(headers_of(r)["x-exactlyonce-reason"] for r in letters)
    assert reasons == ["bad-sequence", "bad-sequence", "handler-error", "undecodable-value"]
    failed = next(r for r in letters if headers_of(r)["x-exactlyonce-reason"] == "handler-error")
    assert headers_of(failed)["x-exactlyonce-attempts"] == "2"
    assert _streams_table(engine, scope) == {"x": (3, 0)}
