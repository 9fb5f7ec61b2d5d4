"""Failing handlers and bad input: rolled back, retried, dead-lettered -- never a crash loop."""

from __future__ import annotations

import json
from collections import Counter

from sqlalchemy.orm import Session

from exactlyonce import Message, Retry, ids

from .helpers import (
    Rec,
    as_kind,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    effects,
    engine_for,
    headers_of,
    insert_effect,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    unique,
    wait_all_committed,
)


def _id(message: Message) -> str:
    return (message.header("message-id") or b"").decode()


def test_handler_exception_rolls_back_effects_and_dedup_row(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """A handler that writes then raises leaves no effect; with Retry(attempts=1) the record is dead-lettered once."""
    topic = unique("boom")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url)
    calls: Counter[str] = Counter()

    @app.handler(topic, retry=Retry(attempts=1))
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        calls[_id(message)] += 1
        insert_effect(session, _id(message))
        if _id(message).startswith("fail"):
            raise RuntimeError("boom")

    positions = produce(bootstrap_servers, topic, [rec("fail-1", "payload-1"), rec("ok-1")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    # (A handler may run more than once for a record whose batch failed; every
    # such run was rolled back. The attempt count is what the policy limits.)
    assert calls["fail-1"] >= 1 and calls["ok-1"] >= 1
    assert effect_counts(engine) == {"ok-1": 1}
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [
        ("fail-1", "dead_lettered"), ("ok-1", "applied")]
    dead = read_topic(bootstrap_servers, f"{topic}.dlq")
    assert len(dead) == 1
    headers = headers_of(dead[0])
    assert dead[0].value == b"payload-1"
    assert headers["message-id"] == "fail-1"  # the original headers are kept
    assert headers["x-exactlyonce-reason"] == "handler-error"
    assert headers["x-exactlyonce-error-type"] == "RuntimeError"
    assert headers["x-exactlyonce-message-id"] == "fail-1"
    assert headers["x-exactlyonce-attempts"] == "1"
    assert (headers["x-exactlyonce-topic"], headers["x-exactlyonce-partition"],
            headers["x-exactlyonce-offset"]) == (topic, *map(str, positions[0]))
    engine.dispose()


def test_handler_failing_once_then_succeeding_applies_once(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """With Retry(attempts=3), a handler that fails on its first try is retried and its effect is kept exactly once."""
    topic = unique("flaky")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url)
    calls: Counter[str] = Counter()

    @app.handler(topic, retry=Retry(attempts=3))
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        calls[_id(message)] += 1
        insert_effect(session, _id(message), f"attempt {calls[_id(message)]}")
        if calls[_id(message)] == 1:
            raise RuntimeError("first attempt fails")

    produce(bootstrap_servers, topic, [rec("flaky-1"), rec("flaky-2")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    assert calls["flaky-1"] >= 2 and calls["flaky-2"] >= 2
    assert effect_counts(engine) == {"flaky-1": 1, "flaky-2": 1}
    with engine.connect() as conn:
        # Only the last, successful run's write is kept.
        assert {(row.message_id, row.payload) for row in conn.execute(effects.select())} == {
            ("flaky-1", f"attempt {calls['flaky-1']}"), ("flaky-2", f"attempt {calls['flaky-2']}")}
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [
        ("flaky-1", "applied"), ("flaky-2", "applied")]
    assert read_topic(bootstrap_servers, f"{topic}.dlq") == []
    engine.dispose()


def test_bad_input_is_dead_lettered_and_later_records_still_apply(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """Non-JSON values, missing and over-long IDs go to the DLQ with their reason; the records after them apply."""
    json_topic, header_topic = unique("bad-json"), unique("bad-header")
    for topic in (json_topic, header_topic):
        create_topic(bootstrap_servers, topic)
        create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url)

    @app.handler(json_topic, message_id=ids.json_field("id"))
    @as_kind(handler_kind)
    def handle_json(message: Message, session: Session) -> None:
        insert_effect(session, message.json()["id"])

    @app.handler(header_topic)
    @as_kind(handler_kind)
    def handle_header(message: Message, session: Session) -> None:
        insert_effect(session, _id(message))

    longest_ok, too_long = "y" * 255, "x" * 256
    json_positions = produce(bootstrap_servers, json_topic, [
        Rec(value=json.dumps({"id": "j1"}).encode()),
        Rec(value=b"not json {"),
        Rec(value=json.dumps({"id": "j2"}).encode()),
    ])
    header_positions = produce(bootstrap_servers, header_topic, [
        rec("h1"),
        Rec(value=b"no id header"),
        rec(too_long),
        rec(longest_ok),
        rec("h2"),
    ])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, json_topic, header_topic)

    assert effect_counts(engine) == {"j1": 1, "j2": 1, "h1": 1, longest_ok: 1, "h2": 1}

    json_dead = read_topic(bootstrap_servers, f"{json_topic}.dlq")
    assert [(r.value, headers_of(r)["x-exactlyonce-reason"], headers_of(r)["x-exactlyonce-offset"])
            for r in json_dead] == [(b"not json {", "undecodable-value", str(json_positions[1][1]))]
    header_dead = read_topic(bootstrap_servers, f"{header_topic}.dlq")
    assert [(r.value, headers_of(r)["x-exactlyonce-reason"], headers_of(r)["x-exactlyonce-offset"])
            for r in header_dead] == [
        (b"no id header", "invalid-message-id", str(header_positions[1][1])),
        (f"v:{too_long}".encode(), "invalid-message-id", str(header_positions[2][1])),
    ]
    # Each bad record is remembered by its coordinates, so a redelivery is not dead-lettered twice.
    dead_rows = sorted((r.message_id, r.outcome) for r in dedup_rows(engine) if r.outcome != "applied")
    assert dead_rows == sorted([
        (f"@{json_topic}/0/{json_positions[1][1]}", "dead_lettered"),
        (f"@{header_topic}/0/{header_positions[1][1]}", "dead_lettered"),
        (f"@{header_topic}/0/{header_positions[2][1]}", "dead_lettered"),
    ])
    engine.dispose()
