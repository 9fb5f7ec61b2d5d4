"""Deduplication by message ID, not by partition, offset or payload."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import Message

from .helpers import (
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    engine_for,
    insert_effect,
    insert_effect_async,
    make_app,
    produce,
    rec,
    running,
    total_effects,
    unique,
    wait_all_committed,
)


def _effect_app(bootstrap: str, database_url: str, topic: str, kind: str):  # type: ignore[no-untyped-def]
    app = make_app(bootstrap, database_url)
    if kind == "sync":
        @app.handler(topic)
        def handle(message: Message, session: Session) -> None:
            insert_effect(session, (message.header("message-id") or b"").decode(),
                          (message.value or b"").decode())
    else:
        @app.handler(topic)
        async def handle_async(message: Message, session: AsyncSession) -> None:
            await insert_effect_async(session, (message.header("message-id") or b"").decode(),
                                      (message.value or b"").decode())
    return app


def test_same_id_on_three_partitions_applies_once(bootstrap_servers: str, database_url: str,
                                                  handler_kind: str) -> None:
    """One message ID re-sent to partitions 0, 1 and 2 is applied once; the other two are skipped."""
    topic = unique("dup-partitions")
    create_topic(bootstrap_servers, topic, 3)
    engine = engine_for(database_url)
    create_effects(engine)
    app = _effect_app(bootstrap_servers, database_url, topic, handler_kind)
    produce(bootstrap_servers, topic,
            [rec("dup-1", '{"amount": 5}', partition=p) for p in (0, 1, 2)])

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    assert effect_counts(engine) == {"dup-1": 1}
    rows = dedup_rows(engine)
    assert [(r.scope, r.message_id, r.outcome) for r in rows] == [(f"{app.group_id}:{topic}", "dup-1", "applied")]
    engine.dispose()


def test_identical_payloads_with_different_ids_both_apply(bootstrap_servers: str, database_url: str,
                                                         handler_kind: str) -> None:
    """Two records with the same key and value but different message IDs are two messages."""
    topic = unique("same-payload")
    create_topic(bootstrap_servers, topic, 1)
    engine = engine_for(database_url)
    create_effects(engine)
    app = _effect_app(bootstrap_servers, database_url, topic, handler_kind)
    payload = '{"from": "A", "to": "B", "amount": 10}'
    produce(bootstrap_servers, topic, [rec("t-1", payload, key=b"A"), rec("t-2", payload, key=b"A"),
                                       rec("t-1", payload, key=b"A")])  # the last: a re-send of t-1

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    assert effect_counts(engine) == {"t-1": 1, "t-2": 1}
    assert total_effects(engine) == 2
    rows = dedup_rows(engine)
    assert sorted((r.message_id, r.kafka_offset, r.outcome) for r in rows) == [
        ("t-1", 0, "applied"), ("t-2", 1, "applied")]
    assert len({r.fingerprint for r in rows}) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM effects WHERE payload = :p"), {"p": payload}).scalar() == 2
    engine.dispose()
