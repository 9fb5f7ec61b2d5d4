"""The dedup store: claim a message ID inside the caller's transaction.

``claim`` inserts the ``(scope, message_id)`` row *before* the handler runs.
The primary key decides the winner, not a read-then-write check: when two
consumers hold the same message at once (a rebalance, a zombie), the second
INSERT waits on the first transaction's row lock; it then sees a conflict if
the first committed (DUPLICATE), or inserts if the first rolled back (NEW).

``rowcount`` is not used to decide: with SQLAlchemy 2.1 and psycopg 3 it is -1
for ``INSERT ... ON CONFLICT DO NOTHING``. PostgreSQL and SQLite report the
insert through ``RETURNING``; MySQL/MariaDB through the duplicate-key error.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from exactlyonce.message import Message
from exactlyonce.schema import Outcome, processed

# MySQL / MariaDB error code for "Duplicate entry ... for key".
_MYSQL_DUP_ENTRY = 1062


class Claim(enum.Enum):
    """The result of :func:`claim`."""

    #: The row was inserted: this transaction owns the message; run the handler.
    NEW = "new"
    #: The ID was already processed (committed by someone): skip it.
    DUPLICATE = "duplicate"


def claim(
    session: Session,
    scope: str,
    message_id: str,
    message: Message,
    *,
    outcome: Outcome = Outcome.APPLIED,
) -> Claim:
    """Insert the dedup row for ``(scope, message_id)`` in the session's transaction.

    The row only becomes visible to others when the caller commits; if the
    caller rolls back (the handler failed), the message is unclaimed again.
    """
    row: dict[str, Any] = {
        "scope": scope,
        "message_id": message_id,
        "topic": message.topic,
        "kafka_partition": message.partition,
        "kafka_offset": message.offset,
        "fingerprint": message.fingerprint(),
        "outcome": outcome.value,
        "processed_at": datetime.now(UTC).replace(tzinfo=None),
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = (
            insert(processed)
            .values(row)
            .on_conflict_do_nothing(index_elements=["scope", "message_id"])
            .returning(processed.c.message_id)
        )
        inserted = session.execute(stmt).first()
        return Claim.NEW if inserted is not None else Claim.DUPLICATE
    return _claim_by_integrity_error(session, row, savepoint=dialect not in ("mysql", "mariadb"))


def _claim_by_integrity_error(session: Session, row: dict[str, Any], *, savepoint: bool) -> Claim:
    # MySQL rolls back only the failed statement and keeps the transaction; other
    # databases may abort the transaction, so they get a savepoint around it.
    try:
        if savepoint:
            with session.begin_nested():
                session.execute(sa.insert(processed).values(row))
        else:
            session.execute(sa.insert(processed).values(row))
    except sa.exc.IntegrityError as exc:
        code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
        if savepoint or code == _MYSQL_DUP_ENTRY:
            return Claim.DUPLICATE
        raise
    return Claim.NEW


def stored_fingerprint(session: Session, scope: str, message_id: str) -> str | None:
    """Return the payload fingerprint stored for ``(scope, message_id)``, or ``None``."""
    return session.execute(
        sa.select(processed.c.fingerprint).where(
            processed.c.scope == scope, processed.c.message_id == message_id
        )
    ).scalar_one_or_none()


def lookup(session: Session, scope: str, message_id: str) -> sa.Row[Any] | None:
    """Return the stored dedup row for ``(scope, message_id)``, or ``None``."""
    return session.execute(
        sa.select(processed).where(processed.c.scope == scope, processed.c.message_id == message_id)
    ).first()
