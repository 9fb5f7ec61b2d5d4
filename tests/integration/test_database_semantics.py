"""Behaviour that must be the same on every database (MariaDB once differed on both)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Claim, Message, Retry, claim

from .helpers import (
    create_effects,
    create_topic,
    dedup_rows,
    engine_for,
    headers_of,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    total_effects,
    unique,
    wait_until,
)


def test_message_ids_differing_only_in_case_or_accents_are_distinct(
    database_url: str
) -> None:
    """Message IDs are compared byte for byte: 'order-1', 'Order-1' and 'ordér-1' are three messages."""
    engine = engine_for(database_url)
    message = Message(topic="t", partition=0, offset=0, key=None, value=b"v")
    with Session(engine) as session, session.begin():
        claims = [claim(session, "scope", mid, message) for mid in ("order-1", "Order-1", "ORDER-1", "ordér-1")]
    engine.dispose()
    assert claims == [Claim.NEW] * 4


def test_handler_sql_error_is_dead_lettered_not_retried_as_transient(
    bootstrap_servers: str, database_url: str
) -> None:
    """A handler's SQL error (unknown column) is a handler failure: dead-lettered, not retried forever."""
    topic = unique("sql-error")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url, transient_retry_budget=timedelta(seconds=1))

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        session.execute(sa.text("INSERT INTO effects (message_id, worker, no_such_column) VALUES ('x', '', 1)"))

    produce(bootstrap_servers, topic, [rec("m-1")])
    with running(app):
        dead = wait_until(lambda: read_topic(bootstrap_servers, f"{topic}.dlq"), 15, "a dead letter")

    assert [headers_of(r)["x-exactlyonce-reason"] for r in dead] == ["handler-error"]
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [("m-1", "dead_lettered")]
    assert total_effects(engine) == 0
    engine.dispose()
