"""What a dead letter says about its error, and the ID it is recorded under."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from exactlyonce import Message, ids, logs
from exactlyonce.errors import InvalidMessageId
from exactlyonce.runtime.deadletter import coordinates_id as _coordinates_id
from exactlyonce.runtime.deadletter import error_message as _error_message

SECRET_PARAM = "card-4111111111111111"


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    """Start from no registered literals (earlier tests registered the test databases' passwords)."""
    with logs._literals_lock:
        saved = set(logs._literals)
        logs._literals.clear()
    yield
    with logs._literals_lock:
        logs._literals.clear()
        logs._literals.update(saved)


def _statement_error() -> sa.exc.StatementError:
    """A real driver error, as a handler's failing INSERT raises it."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("INSERT INTO missing_table (card) VALUES (:card)"), {"card": SECRET_PARAM})
    except sa.exc.StatementError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the INSERT should have failed")


def test_error_message_of_a_sql_error_leaves_out_the_parameters() -> None:
    """str() of a StatementError lists its bound values; the dead-letter header keeps the error and SQL only."""
    exc = _statement_error()
    assert SECRET_PARAM in str(exc)  # what the header carried before
    text = _error_message(exc)
    assert SECRET_PARAM not in text
    assert "no such table: missing_table" in text
    assert "[SQL: INSERT INTO missing_table (card) VALUES (?)]" in text
    assert "[SQL parameters left out]" in text


def test_error_message_is_redacted_and_bounded() -> None:
    """Secrets are masked as in the logs (exactlyonce.logs.redact); the text stops at 1000 characters."""
    exc = RuntimeError("cannot reach postgresql://app:Sup3r-S3cret@db/app; password=hunter22 " + "x" * 2000)
    text = _error_message(exc)
    assert "Sup3r-S3cret" not in text and "hunter22" not in text
    assert "postgresql://app:***@db/app" in text
    assert len(text) == 1000


def test_coordinates_ids_are_in_the_namespace_message_ids_may_not_use() -> None:
    """A sender cannot send the ID a record is recorded under when it has no usable one."""
    message = Message(topic="t", partition=2, offset=7, key=None, value=b"v")
    long_topic = Message(topic="t" * 249, partition=2, offset=10**15, key=None, value=b"v")
    for record in (message, long_topic):
        coordinates = _coordinates_id(record)
        assert coordinates.startswith(ids.RESERVED_PREFIX)
        assert len(coordinates) <= ids.MAX_MESSAGE_ID_LENGTH
        forged = Message(topic="t", partition=0, offset=0, key=None, value=b"v",
                         headers=(("message-id", coordinates.encode()),))
        with pytest.raises(InvalidMessageId, match="reserved"):
            ids.resolve(ids.header(), forged)
    assert _coordinates_id(message) == "@t/2/7"
