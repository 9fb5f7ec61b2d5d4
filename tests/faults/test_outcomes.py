"""Retries, explicit outcomes and bad input: each ends applied once or dead-lettered once.

The retries, the signals and the fingerprint policies with async def handlers too (``handler_kind``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import DeadLetter, Message, Skip
from exactlyonce.retry import Retry
from tests.integration.helpers import (
    as_kind,
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    engine_for,
    headers_of,
    insert_effect,
    make_app,
    produce,
    read_topic,
    rec,
    run_until_it_fails,
    running,
    unique,
    wait_all_committed,
    wait_until,
)

FAST = dict(backoff=timedelta(milliseconds=1), max_backoff=timedelta(milliseconds=5))




def test_retryable_failures_are_retried_then_applied_once(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """A handler failing twice with a retryable error applies once on the third attempt."""
    topic = unique("retry")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    calls: list[str] = []
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic, retry=Retry(attempts=3, retry_on=(ValueError,), **FAST))
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        calls.append("try")
        insert_effect(session, "m1")
        if len(calls) < 3:
            raise ValueError("flaky")

    produce(bootstrap_servers, topic, [rec("m1")])
    with running(app):
        wait_until(lambda: app.stats["applied"] == 1, 30, "the record applied")
    assert calls == ["try"] * 3
    assert effect_counts(engine) == {"m1": 1}, "the two failed attempts' writes rolled back"
    assert app.stats["dead_lettered"] == 0


def test_non_retryable_error_is_dead_lettered_after_one_attempt(bootstrap_servers: str, database_url: str,
                                                                handler_kind: str) -> None:
    """An exception outside retry_on dead-letters at once, with attempts=1 in the headers."""
    topic = unique("noretry")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    calls: list[str] = []
    app = make_app(bootstrap_servers, database_url)

    # batch_size=1: a failing batch would add an attempt of its own before the split.
    @app.handler(topic, retry=Retry(attempts=5, retry_on=(ValueError,), **FAST), batch_size=1)
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        calls.append("try")
        raise KeyError("not retryable")

    produce(bootstrap_servers, topic, [rec("m1"), rec("m2")])
    with running(app):
        wait_until(lambda: app.stats["dead_lettered"] == 2, 30, "both records dead-lettered")
        wait_all_committed(bootstrap_servers, app.group_id, topic, timeout=15)
    assert calls == ["try", "try"]
    letters = [headers_of(r) for r in read_topic(bootstrap_servers, f"{topic}.dlq")]
    assert sorted((h["message-id"], h["x-exactlyonce-attempts"], h["x-exactlyonce-error-type"])
                  for h in letters) == [("m1", "1", "KeyError"), ("m2", "1", "KeyError")]
    assert {r.outcome for r in dedup_rows(engine)} == {"dead_lettered"}


def test_skip_and_dead_letter_signals(bootstrap_servers: str, database_url: str, handler_kind: str) -> None:
    """Skip keeps no writes but records the message; DeadLetter dead-letters now with its reason."""
    topic = unique("signals")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    calls: list[str] = []
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic, batch_size=1)
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        message_id = (message.header("message-id") or b"").decode()
        calls.append(message_id)
        insert_effect(session, message_id)
        if message_id == "skip-me":
            raise Skip("not for this service")
        if message_id == "reject-me":
            raise DeadLetter("over-limit")

    produce(bootstrap_servers, topic, [rec("skip-me"), rec("reject-me"), rec("ok"), rec("skip-me")])
    with running(app):
        wait_until(lambda: sum(app.stats[k] for k in ("applied", "skipped", "dead_lettered", "duplicate")) == 4,
                   30, "four records handled")
    assert calls == ["skip-me", "reject-me", "ok"], "signals are not retried; the re-sent skip is a duplicate"
    assert effect_counts(engine) == {"ok": 1}
    assert {r.message_id: r.outcome for r in dedup_rows(engine)} == {
        "skip-me": "skipped", "reject-me": "dead_lettered", "ok": "applied"}
    (letter,) = [headers_of(r) for r in read_topic(bootstrap_servers, f"{topic}.dlq")]
    assert letter["x-exactlyonce-reason"] == "over-limit"
    assert letter["x-exactlyonce-error-type"] == "DeadLetter"


@pytest.mark.parametrize("policy", ["dead_letter", "skip"])
def test_fingerprint_mismatch(bootstrap_servers: str, database_url: str, policy: str, handler_kind: str) -> None:
    """A known ID re-sent with a different payload is dead-lettered (default) or skipped, never applied."""
    topic = unique("mismatch")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic, on_fingerprint_mismatch=policy)
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, "t1", (message.value or b"").decode())

    produce(bootstrap_servers, topic, [rec("t1", '{"amount": 100}'), rec("t1", '{"amount": 100}'),
                                       rec("t1", '{"amount": 999}')])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic, timeout=30)
    with engine.connect() as conn:
        payloads = [r[0] for r in conn.execute(sa.text("SELECT payload FROM effects"))]
    assert payloads == ['{"amount": 100}']
    assert app.stats["fingerprint_mismatch"] == 1
    letters = [headers_of(r) for r in read_topic(bootstrap_servers, f"{topic}.dlq")]
    if policy == "dead_letter":
        assert [(h["x-exactlyonce-reason"], h["x-exactlyonce-offset"]) for h in letters] \
            == [("fingerprint-mismatch", "2")]
        assert app.stats["dead_lettered:fingerprint-mismatch"] == 1
    else:
        assert letters == []
        assert app.stats["duplicate"] == 2


def test_oversized_value_is_dead_lettered_unread(bootstrap_servers: str, database_url: str) -> None:
    """A value over max_value_bytes is dead-lettered with reason oversized-value; the rest go on."""
    topic = unique("big")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url)
    seen: list[str] = []

    @app.handler(topic, max_value_bytes=100)
    def handle(message: Message, session: Session) -> None:
        seen.append((message.header("message-id") or b"").decode())

    produce(bootstrap_servers, topic, [rec("small"), rec("big", "x" * 101), rec("after")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic, timeout=30)
    assert seen == ["small", "after"]
    (letter,) = [headers_of(r) for r in read_topic(bootstrap_servers, f"{topic}.dlq")]
    assert letter["x-exactlyonce-reason"] == "oversized-value"


def test_failed_dead_letter_publish_advances_nothing(bootstrap_servers: str, database_url: str) -> None:
    """If the dead letter cannot be published (for now), no dedup row is written and no offset is committed."""
    engine = engine_for(database_url)
    topic = unique("dlqfail")
    create_topic(bootstrap_servers, topic)
    # The producer gives up waiting for the dead-letter topic's metadata at
    # once: every publish fails as a broker timeout does, a transient failure.
    app = make_app(bootstrap_servers, database_url, transient_retry_budget=timedelta(milliseconds=300),
                   producer_config={"max_block_ms": 1})
    calls: list[str] = []

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        calls.append("try")
        raise RuntimeError("poison")

    produce(bootstrap_servers, topic, [rec("p1", "x" * 300)])
    with running(app):
        # Each failed publish rolls back and rewinds; the record comes back.
        wait_until(lambda: len(calls) >= 3, 60, "the record retried after failed publishes")
        committed, _ = committed_and_end_offsets(bootstrap_servers, app.group_id, topic)
        assert committed[0] in (None, 0)
        assert dedup_rows(engine) == []
    assert app.stats["dead_lettered"] == 0


def test_a_dead_letter_no_topic_can_take_stops_the_worker(bootstrap_servers: str, database_url: str) -> None:
    """Too large even as a bounded copy (tiny max_request_size): run() ends, ConfigurationError, nothing advanced."""
    from exactlyonce import ConfigurationError

    engine = engine_for(database_url)
    topic = unique("dlqrefused")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url, producer_config={"max_request_size": 200})
    calls: list[str] = []

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        calls.append("try")
        raise RuntimeError("poison")

    produce(bootstrap_servers, topic, [rec("p1", "x" * 300)])
    error = run_until_it_fails(app, 60)
    assert isinstance(error, ConfigurationError) and f"{topic}.dlq' refuses even a bounded dead letter" in str(error)
    assert calls == ["try"]
    committed, _ = committed_and_end_offsets(bootstrap_servers, app.group_id, topic)
    assert committed[0] in (None, 0)
    assert dedup_rows(engine) == []
    assert app.stats["dead_lettered"] == 0


def test_redelivered_dead_letter_is_not_dead_lettered_twice(bootstrap_servers: str, database_url: str) -> None:
    """A second consumer group reading the same records under the same scope adds no dead letter."""
    topic = unique("dlqonce")
    create_topic(bootstrap_servers, topic)

    def build(group: str) -> Any:
        app = make_app(bootstrap_servers, database_url, group=group)

        @app.handler(topic, name=f"scope-{topic}", retry=Retry(attempts=1))
        def handle(message: Message, session: Session) -> None:
            raise RuntimeError("poison")

        return app

    produce(bootstrap_servers, topic, [rec("p1"), rec(None, b"no id")])
    first = build(unique("g"))
    with running(first):
        wait_until(lambda: first.stats["dead_lettered"] == 2, 30, "two dead letters")
    second = build(unique("g"))
    with running(second):
        wait_all_committed(bootstrap_servers, second.group_id, topic, timeout=30)
    assert second.stats["duplicate"] == 2 and second.stats["dead_lettered"] == 0
    assert len(read_topic(bootstrap_servers, f"{topic}.dlq")) == 2
