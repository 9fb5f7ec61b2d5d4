"""Only the dedup key's violation makes a claim a duplicate.

Any other integrity error on the insert (here a second unique index on the
dedup table, as a DBA or a trigger might add) is an error, not a message
someone already processed: calling it a duplicate would skip the record
silently.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Claim, Message, claim
from exactlyonce.storage import store
from exactlyonce.storage.dialects import GENERIC, dialect_of
from exactlyonce.storage.schema import Outcome, processed

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


def test_claim_one_calls_only_the_dedup_key_a_duplicate(engine: sa.Engine) -> None:
    """The single-row claim (MySQL/MariaDB's, and the fallback's) with each database's reading of the error.

    Without a savepoint only on MySQL/MariaDB: only they keep a transaction
    usable after a failed statement. There it is also tried in a savepoint.
    """
    dialect = dialect_of(engine)
    assert dialect.claims_in_savepoint is (engine.dialect.name not in ("mysql", "mariadb"))
    variants = [dialect]
    if not dialect.claims_in_savepoint:
        variants.append(type("InSavepoint", (type(dialect),), {"claims_in_savepoint": True})())
    for n, variant in enumerate(variants):
        second, third = f"second-{n}", f"third-{n}"
        with Session(engine) as session, session.begin():  # "first": the fixture's claim
            assert variant.claim_one(session, _row("first", 2 + 10 * n)) is False
        with Session(engine) as session, pytest.raises(sa.exc.IntegrityError), session.begin():
            variant.claim_one(session, _row(second, 1))
        with Session(engine) as session, session.begin():
            assert variant.claim_one(session, _row(third, 3 + 10 * n)) is True


def test_the_fallback_decides_by_reading_the_row(engine: sa.Engine) -> None:
    """A database without a class of its own: a duplicate is a dedup row that exists."""
    for message_id, offset, duplicate in (("first", 2, True), ("second", 1, False)):
        with Session(engine) as session, session.begin():
            with pytest.raises(sa.exc.IntegrityError) as caught, session.begin_nested():
                session.execute(sa.insert(processed).values(_row(message_id, offset)))
            assert GENERIC.is_dedup_conflict(session, caught.value, _row(message_id, offset)) is duplicate


def test_the_fallback_claims_on_every_database(engine: sa.Engine) -> None:
    """The portable claim (one row at a time in a savepoint) on this server: duplicates skipped, other errors raised."""
    with Session(engine) as session, session.begin():
        rows = [_row("first", 20), _row("fourth", 21), _row("fifth", 22)]
        assert GENERIC.claim(session, rows) == {"fourth", "fifth"}
    with Session(engine) as session, pytest.raises(sa.exc.IntegrityError), session.begin():
        GENERIC.claim(session, [_row("sixth", 1)])  # another unique index's violation
    with Session(engine) as session:
        stored = set(session.execute(sa.select(processed.c.message_id).where(processed.c.scope == SCOPE)).scalars())
    assert stored == {"first", "fourth", "fifth"}
