"""The store of sequenced handlers: a watermark per stream, and parked messages.

A sequenced handler numbers each stream's messages 1, 2, 3, ... The store
keeps one row per stream (``exactlyonce_sequence_streams``): every number up
to ``watermark`` has been handled, in order. A message ahead of its turn is
parked (``exactlyonce_parked``) until the numbers before it have been handled.
Storage is O(streams + parked), not O(messages).

Every transaction that touches a stream first locks its row (``SELECT ... FOR
UPDATE``) and ends by writing it. The lock serializes the workers that hold
messages of one stream on different partitions; the write makes a worker that
runs at REPEATABLE READ or SERIALIZABLE fail with a serialization error (a
transient error: the batch is retried) instead of reading a stale set of
parked rows. Parked rows are read with locking reads too, which see the latest
committed rows on MySQL/MariaDB at REPEATABLE READ (their default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce.errors import BadSequence, InvalidStream
from exactlyonce.ids import text_problem
from exactlyonce.message import Message, headers_from_json, headers_to_json
from exactlyonce.settings import utcnow as utcnow  # re-exported: seq.utcnow() was defined here
from exactlyonce.storage.dialects import dialect_of
from exactlyonce.storage.schema import MAX_STREAM_LENGTH, parked, sequence_streams


@dataclass(slots=True)
class Stream:
    """One stream's row, as locked by this transaction."""

    stream: str
    watermark: int
    parked: int
    gap_since: datetime | None


def parse(value: Any, message: Message) -> tuple[str, int]:
    """Check what a ``sequence`` callable returned: ``(non-empty str, int >= 1)``.

    A stream the database cannot store exactly (too long, not UTF-8, a
    control character) is an :class:`~exactlyonce.errors.InvalidStream`.
    """
    if not (isinstance(value, tuple) and len(value) == 2):
        raise BadSequence(f"{message.where()}: sequence must return (stream, number), got {value!r}")
    stream, number = value
    if not isinstance(stream, str) or not stream:
        raise BadSequence(
            f"{message.where()}: stream must be a string of 1 to {MAX_STREAM_LENGTH} characters, got {stream!r}"
        )
    problem = text_problem(stream, MAX_STREAM_LENGTH)
    if problem is not None:
        raise InvalidStream(f"{message.where()}: stream {problem}")
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise BadSequence(f"{message.where()}: sequence number must be an integer >= 1, got {number!r}")
    if number >= 2**63:
        raise BadSequence(f"{message.where()}: sequence number {number} does not fit a 64-bit column")
    return stream, number


def lock(session: Session, scope: str, streams: Iterable[str], now: datetime) -> dict[str, Stream]:
    """Create the missing stream rows, lock all of them, and return them by stream.

    Rows are locked in stream order, so two workers locking overlapping sets
    wait for each other instead of deadlocking (a deadlock that happens anyway
    is a transient error and the batch is retried).
    """
    names = sorted(set(streams))
    if not names:
        return {}
    rows = [
        {"scope": scope, "stream": name, "watermark": 0, "parked": 0, "gap_since": None, "updated_at": now}
        for name in names
    ]
    dialect_of(session).create_streams(session, rows)
    table = sequence_streams
    found = session.execute(
        sa.select(table.c.stream, table.c.watermark, table.c.parked, table.c.gap_since)
        .where(table.c.scope == scope, table.c.stream.in_(names))
        .order_by(table.c.stream)
        .with_for_update()
    ).all()
    return {row.stream: Stream(row.stream, row.watermark, row.parked, row.gap_since) for row in found}


def save(session: Session, scope: str, streams: Iterable[Stream], now: datetime) -> None:
    """Write back every locked stream (always, even unchanged: see the module docstring)."""
    table = sequence_streams
    params = [
        {"s": scope, "n": s.stream, "w": s.watermark, "p": s.parked, "g": s.gap_since, "u": now} for s in streams
    ]
    if params:
        session.execute(
            sa.update(table)
            .where(table.c.scope == sa.bindparam("s"), table.c.stream == sa.bindparam("n"))
            .values(watermark=sa.bindparam("w"), parked=sa.bindparam("p"), gap_since=sa.bindparam("g"),
                    updated_at=sa.bindparam("u")),
            params,
        )


def park(
    session: Session, scope: str, stream: str, number: int, message_id: str, message: Message, now: datetime
) -> str | None:
    """Park ``message`` as number ``number``; return ``None``, or the fingerprint already parked there."""
    existing = parked_fingerprint(session, scope, stream, number)
    if existing is not None:
        return existing
    session.execute(
        sa.insert(parked).values(
            scope=scope,
            stream=stream,
            number=number,
            message_id=message_id,
            topic=message.topic,
            kafka_partition=message.partition,
            kafka_offset=message.offset,
            key=message.key,
            value=message.value,
            headers=headers_to_json(message.headers),
            timestamp_ms=message.timestamp_ms,
            fingerprint=message.fingerprint(),
            parked_at=now,
        )
    )
    return None


def parked_fingerprint(session: Session, scope: str, stream: str, number: int) -> str | None:
    """The fingerprint of the message parked as ``number`` (locked), or ``None``."""
    key = (parked.c.scope == scope, parked.c.stream == stream, parked.c.number == number)
    existing = session.execute(sa.select(parked.c.fingerprint).where(*key).with_for_update()).scalar()
    return None if existing is None else str(existing)


def take(session: Session, scope: str, stream: str, number: int) -> tuple[str, Message] | None:
    """Remove and return the message parked as ``number`` (its ID and the message), if any."""
    key = (parked.c.scope == scope, parked.c.stream == stream, parked.c.number == number)
    row = session.execute(sa.select(parked).where(*key).with_for_update()).first()
    if row is None:
        return None
    session.execute(sa.delete(parked).where(*key))
    return row.message_id, _message(row)


def take_first(session: Session, scope: str, stream: str, limit: int) -> list[tuple[int, str, Message]]:
    """Remove and return the ``limit`` lowest-numbered messages parked for ``stream``, in number order.

    Bounded, so that giving up a long gap holds its locks and its memory for
    one chunk at a time.
    """
    where = (parked.c.scope == scope, parked.c.stream == stream)
    rows = session.execute(
        sa.select(parked).where(*where).order_by(parked.c.number).limit(limit).with_for_update()
    ).all()
    if rows:
        session.execute(sa.delete(parked).where(*where, parked.c.number.in_([row.number for row in rows])))
    return [(row.number, row.message_id, _message(row)) for row in rows]


def ready(session: Session, scope: str, limit: int) -> list[str]:
    """Streams of ``scope`` whose next number is parked: a release was cut short, to be continued.

    Not locked: the caller locks them with :func:`lock` and takes what is
    still there.
    """
    s, p = sequence_streams, parked
    stmt = (
        sa.select(s.c.stream)
        .join(p, sa.and_(p.c.scope == s.c.scope, p.c.stream == s.c.stream, p.c.number == s.c.watermark + 1))
        .where(s.c.scope == scope, s.c.parked > 0)
        .order_by(s.c.stream)
        .limit(limit)
    )
    return list(session.execute(stmt).scalars())


def overdue(
    session: Session, scope: str, cutoff: datetime, *, lock_rows: bool = False, limit: int | None = None
) -> Sequence[Stream]:
    """The streams of ``scope`` whose gap opened before ``cutoff`` (by stream name), at most ``limit``."""
    table = sequence_streams
    stmt = (
        sa.select(table.c.stream, table.c.watermark, table.c.parked, table.c.gap_since)
        .where(table.c.scope == scope, table.c.gap_since < cutoff, table.c.parked > 0)
        .order_by(table.c.stream)
        .limit(limit)
    )
    if lock_rows:
        stmt = stmt.with_for_update()
    return [Stream(r.stream, r.watermark, r.parked, r.gap_since) for r in session.execute(stmt)]


def _message(row: Any) -> Message:
    return Message(
        topic=row.topic,
        partition=row.kafka_partition,
        offset=row.kafka_offset,
        key=row.key,
        value=row.value,
        headers=headers_from_json(row.headers),
        timestamp_ms=row.timestamp_ms,
    )
