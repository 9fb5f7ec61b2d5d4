"""The operator's side of refused rows: listing them with what waits behind each, releasing, discarding.

A row the broker refused for good (migration 0005's ``refused_at`` and
``refusal``) is not sent again, and the later rows of its topic and key wait
behind it, until it is released (made pending again) or discarded (deleted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce.storage.schema import outbox


@dataclass(frozen=True, slots=True)
class RefusedRow:
    """An outbox row the broker refused for good, and what waits behind it."""

    id: int
    topic: str
    key: bytes | None
    message_id: str
    created_at: datetime
    refused_at: datetime
    #: The broker's error, as the relay met it.
    reason: str
    #: Later pending rows of the same topic and key: they wait until this one is released or discarded.
    waiting: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the key as UTF-8 text with replacement characters)."""
        return {
            "id": self.id, "topic": self.topic,
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "message_id": self.message_id, "created_at": _iso(self.created_at),
            "refused_at": _iso(self.refused_at), "reason": self.reason, "waiting": self.waiting,
        }


def _iso(value: datetime) -> str:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def refused(engine: Engine, *, limit: int | None = None) -> list[RefusedRow]:
    """The rows the broker refused that are still pending, oldest first, each with the rows waiting behind it."""
    with engine.connect() as conn:
        stmt = (
            sa.select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.message_id, outbox.c.ordering_key,
                      outbox.c.created_at, outbox.c.refused_at, outbox.c.refusal)
            .where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
            .order_by(outbox.c.id)
        )
        rows = conn.execute(stmt.limit(limit) if limit is not None else stmt).all()
        waiting: dict[int, int] = {}
        for row in rows:
            waiting[row.id] = int(conn.execute(
                sa.select(sa.func.count()).select_from(outbox).where(
                    outbox.c.ordering_key == row.ordering_key, outbox.c.sent_at.is_(None), outbox.c.id > row.id)
            ).scalar_one())
    return [
        RefusedRow(id=row.id, topic=row.topic, key=row.key, message_id=row.message_id, created_at=row.created_at,
                   refused_at=row.refused_at, reason=row.refusal or "", waiting=waiting[row.id])
        for row in rows
    ]


def release(engine: Engine, ids: Iterable[int] | None = None) -> int:
    """Make refused rows (``ids``, or all with ``None``) pending again; return how many.

    The relays then send each first, then the rows of its key that waited
    behind it, in order. Fix the cause first (the topic's
    ``max.message.bytes``, its ACLs): a row refused again is marked refused
    again.
    """
    stmt = sa.update(outbox).where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
    if ids is not None:
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        stmt = stmt.where(outbox.c.id.in_(wanted))
    with engine.begin() as conn:
        return int(conn.execute(stmt.values(refused_at=None, refusal=None)).rowcount)


def discard(engine: Engine, ids: Iterable[int]) -> int:
    """Delete refused rows ``ids`` (never sent: their records are lost); return how many.

    The rows that waited behind them go on. Only refused rows are deleted;
    other ids are ignored.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return 0
    with engine.begin() as conn:
        return int(conn.execute(sa.delete(outbox).where(
            outbox.c.id.in_(wanted), outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None)
        )).rowcount)
