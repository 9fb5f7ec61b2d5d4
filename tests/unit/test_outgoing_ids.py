"""What a consumer would dead-letter as an unusable ID, a sender refuses (Producer.send, publish())."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, Producer, migrate, publish
from exactlyonce.ids import MAX_MESSAGE_ID_LENGTH, RESERVED_PREFIX, outgoing_problem
from exactlyonce.storage import engine as _db

BAD: list[Any] = ["", "a\x00b", "line\nbreak", "\ud800", "x" * (MAX_MESSAGE_ID_LENGTH + 1),
                  f"{RESERVED_PREFIX}t/0/1", 42]
GOOD = ["t-1", "ü-ß-✓", "x" * MAX_MESSAGE_ID_LENGTH, "a@b"]


@pytest.mark.parametrize("message_id", BAD)
def test_refused_ids(message_id: Any) -> None:
    assert outgoing_problem(message_id) is not None


@pytest.mark.parametrize("message_id", GOOD)
def test_accepted_ids(message_id: str) -> None:
    assert outgoing_problem(message_id) is None


@pytest.mark.parametrize("message_id", BAD)
def test_publish_refuses_what_a_consumer_would_dead_letter(tmp_path: Path, message_id: Any) -> None:
    engine = _db.create_engine(f"sqlite:///{tmp_path}/t.db")
    migrate.upgrade(engine)
    with Session(engine) as session, session.begin(), pytest.raises(ConfigurationError, match="message_id"):
        publish(session, "out", b"v", message_id=message_id)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exactlyonce_outbox")).scalar() == 0
    engine.dispose()


@pytest.mark.parametrize("message_id", BAD)
def test_producer_refuses_before_sending(message_id: Any) -> None:
    # A broker address that never answers: the check comes before anything is sent.
    producer = Producer("127.0.0.1:1", config={"api_version": (2, 5)})
    try:
        with pytest.raises(ConfigurationError, match="message_id"):
            producer.send("out", b"v", message_id=message_id)
        assert producer._pending == []
    finally:
        producer._producer.close()
