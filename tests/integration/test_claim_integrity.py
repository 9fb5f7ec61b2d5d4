"""Only the dedup key's violation makes a claim a duplicate.

Any other integrity error on the insert (here a second unique index on the
dedup table, as a DBA or a trigger might add) is an error, not a message
someone already processed: calling it a duplicate would skip the record
silently.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Claim, Message, claim, store
from exactlyonce.schema import Outcome, processed

from .helpers import engine_for

SCOPE = "integrity:topic"


def _message(offset: int) -> Message:
    return Message(topic="topic", partition=0, offset=offset, key=None, value=b"payload")


def _row(message_id: str, offset: int) -> dict[str, Any]:
    return store._row(SCOPE, message_id, _message(offset), Outcome.APPLIED, datetime.now(UTC).replace(tzinfo=None))


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = engine_for(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE UNIQUE INDEX uq_integrity_coordinates ON {processed.name} "
                             "(topic, kafka_partition, kafka_offset)"))
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "first", _message(1)) is Claim.NEW
    yield engine
    engine.dispose()


def test_claim_tells_the_dedup_key_from_another_unique_key(engine: sa.Engine) -> None:
    """The same ID is a duplicate; a new ID that violates another unique index raises."""
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "first", _message(2)) is Claim.DUPLICATE
    with Session(engine) as session, pytest.raises(sa.exc.IntegrityError), session.begin():
        claim(session, SCOPE, "second", _message(1))


def test_insert_one_calls_only_the_dedup_key_a_duplicate(engine: sa.Engine) -> None:
    """The single-row insert (MySQL/MariaDB, and other dialects in a savepoint) on every database.

    Without a savepoint only on MySQL/MariaDB: only they keep a transaction
    usable after a failed statement.
    """
    mysql = engine.dialect.name in ("mysql", "mariadb")
    for savepoint in (True, False) if mysql else (True,):
        second, third = f"second-{savepoint}", f"third-{savepoint}"
        with Session(engine) as session, session.begin():  # "first": the fixture's claim
            assert store._insert_one(session, _row("first", 2 + 10 * savepoint), savepoint=savepoint) is False
        with Session(engine) as session, pytest.raises(sa.exc.IntegrityError), session.begin():
            store._insert_one(session, _row(second, 1), savepoint=savepoint)
        with Session(engine) as session, session.begin():
            assert store._insert_one(session, _row(third, 3 + 10 * savepoint), savepoint=savepoint) is True


def test_another_dialect_decides_by_reading_the_row(engine: sa.Engine) -> None:
    """A dialect whose errors are not parsed: a duplicate is a dedup row that exists."""

    class OtherDialect:
        def __init__(self, session: Session) -> None:
            self._session = session

        def get_bind(self) -> Any:
            return SimpleNamespace(dialect=SimpleNamespace(name="other"))

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            return self._session.execute(*args, **kwargs)

    for message_id, offset, duplicate in (("first", 2, True), ("second", 1, False)):
        with Session(engine) as session, session.begin():
            with pytest.raises(sa.exc.IntegrityError) as caught, session.begin_nested():
                session.execute(sa.insert(processed).values(_row(message_id, offset)))
            assert store._is_dedup_conflict(OtherDialect(session), caught.value, _row(message_id, offset)) is duplicate
