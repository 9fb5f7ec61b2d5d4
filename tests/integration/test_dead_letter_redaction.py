"""The ``x-exactlyonce-error-message`` header says what failed without leaking what was written."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Message, Retry

from .helpers import create_topic, headers_of, make_app, produce, read_topic, rec, running, unique, wait_all_committed

CARD = "4111-1111-1111-1111"
PASSWORD = "Db-Pa55-in-a-message"


def test_error_message_header_has_no_sql_parameters_and_no_secrets(bootstrap_servers: str, database_url: str) -> None:
    topic = unique("redact")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    app = make_app(bootstrap_servers, database_url, outbox=False)

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        if message.header("message-id") == b"sql":
            session.execute(sa.text("INSERT INTO exactlyonce_no_such_table (card) VALUES (:card)"), {"card": CARD})
        raise RuntimeError(f"cannot reach postgresql://app:{PASSWORD}@db/app")

    produce(bootstrap_servers, topic, [rec("sql"), rec("url")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    messages = {headers_of(r)["x-exactlyonce-message-id"]: headers_of(r)["x-exactlyonce-error-message"]
                for r in read_topic(bootstrap_servers, f"{topic}.dlq")}
    assert set(messages) == {"sql", "url"}
    assert CARD not in messages["sql"]
    assert "exactlyonce_no_such_table" in messages["sql"]
    assert "[SQL: INSERT INTO exactlyonce_no_such_table (card) VALUES (" in messages["sql"]
    assert "[SQL parameters left out]" in messages["sql"]
    assert PASSWORD not in messages["url"]
    assert "://app:***@db/app" in messages["url"]
