"""No input a producer can send stops a worker.

Message IDs and stream names the database cannot store (a lone surrogate from
a JSON escape, NUL, control characters, over-long text) used to fail the
claim like a handler error, then fail the dead letter's claim of the same ID,
and escape ``run()``: the partition moved to the next worker, which died the
same way. They are refused before anything is claimed and dead-lettered with
their reason; the records around them are applied once, and the offsets reach
the end of every partition.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, Message, Retry, ids
from exactlyonce.runtime import deadletter

from .helpers import (
    Rec,
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
    running,
    unique,
    wait_all_committed,
)
from .sequence_effects import applied, insert_seq_effect, metadata, record, stream_and_number

pytestmark = pytest.mark.service

EMOJI_ID = "\U0001f600" * 255  # 255 characters, 1020 bytes: fits every database's VARCHAR(255)


def _app(bootstrap: str, database_url: str, topics: dict[str, str], group: str | None = None) -> App:
    app = make_app(bootstrap, database_url, group=group, outbox=False)

    @app.handler(topics["json"], name=f"scope-{topics['json']}", retry=Retry(attempts=1),
                 message_id=ids.json_field("transfer_id"))
    def handle_json(message: Message, session: Session) -> None:
        body = message.json()
        if "account" in body:
            # An error whose text is the producer's (here a lone surrogate).
            raise ValueError(f"unknown account {body['account']}")
        insert_effect(session, body["transfer_id"], body.get("amount"))

    @app.handler(topics["header"], name=f"scope-{topics['header']}", retry=Retry(attempts=1))
    def handle_header(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode())

    @app.handler(topics["seq"], name=f"scope-{topics['seq']}", retry=Retry(attempts=1),
                 sequence=stream_and_number)
    def handle_seq(message: Message, session: Session) -> None:
        insert_seq_effect(session, message)

    return app


def test_poison_ids_and_streams_are_dead_lettered_and_the_worker_keeps_going(
    bootstrap_servers: str, database_url: str
) -> None:
    topics = {kind: unique(f"poison-{kind}") for kind in ("json", "header", "seq")}
    for topic in topics.values():
        create_topic(bootstrap_servers, topic)
        create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    metadata.create_all(engine)

    def transfer(transfer_id: str, **more: Any) -> Rec:
        return Rec(value=json.dumps({"transfer_id": transfer_id, **more}).encode())

    json_topic = topics["json"]
    json_records = [
        transfer("j1", amount="1"),                                   # 0
        Rec(value=b'{"transfer_id": "\\ud800", "amount": "2"}'),      # 1 lone surrogate
        transfer("j2"),                                               # 2
        # 3: the ID record 5 is recorded under when it is dead-lettered for
        # its fingerprint: a forged claim of it would hide that dead letter.
        transfer(f"@{json_topic}/0/5"),
        transfer("j3"),                                               # 4
        transfer("j1", amount="999"),                                 # 5 j1 again, another payload
        Rec(value=b'{"transfer_id": "j4", "account": "\\udfff"}'),    # 6 handler error, surrogate in its text
        transfer("j5"),                                               # 7
    ]
    header_records = [
        rec("h1"),                                                    # 0
        rec("h\x00nul"),                                              # 1 NUL: PostgreSQL cannot store it
        rec("x" * 256),                                               # 2 over-long
        rec("h\x1b[2Jclear"),                                         # 3 a terminal escape
        Rec(value=b"cesu", headers=(("message-id", b"\xed\xa0\x80"),)),  # 4 an encoded surrogate: not UTF-8
        rec(EMOJI_ID),                                                # 5 fine: 255 four-byte characters
        rec("h2"),                                                    # 6
    ]
    seq_records = [
        record("s", 1),                                               # 0
        Rec(value=b'{"stream": "\\ud800", "n": 1}'),                  # 1
        Rec(value=b'{"stream": "nul\\u0000", "n": 1}'),               # 2
        record("y" * 256, 1),                                         # 3
        record("s", 2),                                               # 4
    ]
    produce(bootstrap_servers, json_topic, json_records)
    produce(bootstrap_servers, topics["header"], header_records)
    produce(bootstrap_servers, topics["seq"], seq_records)

    app = _app(bootstrap_servers, database_url, topics)
    with running(app):  # re-raises whatever ends run() early
        wait_all_committed(bootstrap_servers, app.group_id, *topics.values())

    assert effect_counts(engine) == {"j1": 1, "j2": 1, "j3": 1, "j5": 1, "h1": 1, EMOJI_ID: 1, "h2": 1}
    assert applied(engine) == {"s": [1, 2]}
    expected_dead = {
        json_topic: [(1, "invalid-message-id"), (3, "invalid-message-id"), (5, "fingerprint-mismatch"),
                     (6, "handler-error")],
        topics["header"]: [(1, "invalid-message-id"), (2, "invalid-message-id"), (3, "invalid-message-id"),
                           (4, "invalid-message-id")],
        topics["seq"]: [(1, "invalid-stream"), (2, "invalid-stream"), (3, "invalid-stream")],
    }

    def dead_by_offset(topic: str) -> list[tuple[int, str]]:
        return sorted((int(headers_of(r)["x-exactlyonce-offset"]), headers_of(r)["x-exactlyonce-reason"])
                      for r in read_topic(bootstrap_servers, f"{topic}.dlq"))

    for topic, dead in expected_dead.items():
        assert dead_by_offset(topic) == dead, topic
    assert app.stats["dead_lettered:invalid-message-id"] == 6
    assert app.stats["dead_lettered:invalid-stream"] == 3
    # The handler error's text reached the header, its lone surrogate escaped.
    failed = next(r for r in read_topic(bootstrap_servers, f"{json_topic}.dlq")
                  if headers_of(r)["x-exactlyonce-reason"] == "handler-error")
    assert headers_of(failed)["x-exactlyonce-error-message"] == "unknown account \\udfff"
    assert headers_of(failed)["x-exactlyonce-message-id"] == "j4"
    # Records without a usable ID are recorded under their coordinates; a
    # producer cannot send such an ID.
    rows = {(r.message_id, r.outcome) for r in dedup_rows(engine, f"scope-{json_topic}")}
    assert rows == {("j1", "applied"), ("j2", "applied"), ("j3", "applied"), ("j5", "applied"),
                    ("j4", "dead_lettered"), *((f"@{json_topic}/0/{o}", "dead_lettered") for o in (1, 3, 5))}

    # Everything redelivered (a new group on the same scopes): nothing is
    # applied or dead-lettered a second time.
    again = _app(bootstrap_servers, database_url, topics, group=unique("poison-again"))
    with running(again):
        wait_all_committed(bootstrap_servers, again.group_id, *topics.values())
    assert effect_counts(engine) == {"j1": 1, "j2": 1, "j3": 1, "j5": 1, "h1": 1, EMOJI_ID: 1, "h2": 1}
    assert applied(engine) == {"s": [1, 2]}
    for topic, dead in expected_dead.items():
        assert dead_by_offset(topic) == dead, topic
    outcomes = Counter({k: v for k, v in again.stats.items() if ":" not in k})
    assert outcomes["applied"] == 0 and outcomes["dead_lettered"] == 0
    engine.dispose()


def test_a_dead_letter_whose_id_cannot_be_claimed_is_recorded_under_its_coordinates(
    bootstrap_servers: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes the database refuse a dead letter's ID, the coordinates are claimed instead."""
    topic = unique("unclaimable")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    real_claim = deadletter.claim

    def claim(session: Session, scope: str, message_id: str, message: Message, **kwargs: Any) -> Any:
        if message_id == "refused":
            # A real database error inside the dead letter's transaction (on
            # PostgreSQL it aborts the transaction).
            session.execute(sa.text("SELECT * FROM exactlyonce_no_such_table"))
        return real_claim(session, scope, message_id, message, **kwargs)

    monkeypatch.setattr(deadletter, "claim", claim)
    app = make_app(bootstrap_servers, database_url, outbox=False)

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        message_id = (message.header("message-id") or b"").decode()
        if message_id == "refused":
            raise RuntimeError("this one fails")
        insert_effect(session, message_id)

    produce(bootstrap_servers, topic, [rec("ok-1"), rec("refused"), rec("ok-2")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    assert effect_counts(engine) == {"ok-1": 1, "ok-2": 1}
    dead = read_topic(bootstrap_servers, f"{topic}.dlq")
    assert [(headers_of(r)["x-exactlyonce-reason"], headers_of(r)["x-exactlyonce-message-id"]) for r in dead] == [
        ("handler-error", "refused")]
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [
        ("ok-1", "applied"), (f"@{topic}/0/1", "dead_lettered"), ("ok-2", "applied")]
    engine.dispose()
