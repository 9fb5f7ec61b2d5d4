"""The relay's SQL: which pending rows a batch may send, and marking them sent or refused.

A batch is ONE transaction on a connection from :func:`connect`: :func:`take`
locks its rows (steps 1 and 2 of :mod:`exactlyonce.outbox`), the rows are
sent, and :func:`settle` marks what became of them (step 4) before the
commit. A row refused for good holds back the later rows of its topic and key
(its ``ordering_key``) until an operator releases or discards it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import settings
from exactlyonce.storage.dialects import dialect_of
from exactlyonce.storage.schema import outbox

#: A refusal's text is cut to this many characters in ``exactlyonce_outbox.refusal``.
MAX_REFUSAL_LENGTH = 1000


def connect(engine: Engine) -> sa.Connection:
    """A connection for one batch, at the isolation level the relay needs on its database."""
    conn = engine.connect()
    # READ COMMITTED on PostgreSQL and MySQL/MariaDB: each statement sees
    # the latest commits, and MySQL takes no gap locks: under REPEATABLE
    # READ the locked range would block the publishers' inserts until the
    # batch is sent.
    isolation_level = dialect_of(conn).relay_isolation_level
    if isolation_level is not None:
        conn.execution_options(isolation_level=isolation_level)
    return conn


def take(conn: sa.Connection, limit: int) -> list[sa.Row[Any]]:
    """Lock up to ``limit`` of the oldest sendable rows; return those no earlier pending row of their key precedes.

    Sendable: pending, not refused, and no refused row on their topic and key.
    ``FOR UPDATE SKIP LOCKED``: concurrent relays take different rows (on
    SQLite ``BEGIN IMMEDIATE`` serialises them instead).
    """
    # Few rows (refused ones wait for an operator): read apart, so the
    # locking select below holds no lock on them.
    held_keys = list(conn.execute(
        sa.select(outbox.c.ordering_key).distinct()
        .where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
    ).scalars())
    stmt = (
        sa.select(outbox)
        .where(outbox.c.sent_at.is_(None), outbox.c.refused_at.is_(None))
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if held_keys:
        stmt = stmt.where(outbox.c.ordering_key.not_in(held_keys))
    return _unblocked(conn, conn.execute(stmt).all())


def _unblocked(conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[sa.Row[Any]]:
    """The rows of the batch that no earlier pending row of the same ordering key precedes."""
    if not rows:
        return []
    batch = [row.id for row in rows]
    # SKIP LOCKED passed over a pending row with a smaller id only if
    # another relay holds it (or it committed just now, or another relay
    # marked it refused since the refused keys were read): it goes first.
    earliest = {
        ordering_key: first
        for ordering_key, first in conn.execute(
            sa.select(outbox.c.ordering_key, sa.func.min(outbox.c.id))
            .where(
                outbox.c.sent_at.is_(None),
                outbox.c.ordering_key.in_(sorted({row.ordering_key for row in rows})),
                outbox.c.id < max(batch),
                outbox.c.id.not_in(batch),
            )
            .group_by(outbox.c.ordering_key)
        )
    }
    return [row for row in rows if row.ordering_key not in earliest or row.id < earliest[row.ordering_key]]


def settle(conn: sa.Connection, sent: Sequence[int], refused: Sequence[tuple[sa.Row[Any], str]]) -> None:
    """Set ``sent_at`` on the rows ``sent``, and ``refused_at`` and the reason on each ``(row, reason)`` refused."""
    if sent:
        conn.execute(sa.update(outbox).where(outbox.c.id.in_(sent)).values(sent_at=settings.utcnow()))
    for row, reason in refused:
        conn.execute(sa.update(outbox).where(outbox.c.id == row.id)
                     .values(refused_at=settings.utcnow(), refusal=reason[:MAX_REFUSAL_LENGTH]))


def counts(engine: Engine) -> tuple[int, int]:
    """The rows not yet sent (refused ones included), and the refused ones: one query over the ``sent_at`` index."""
    with engine.connect() as conn:
        pending, refused = conn.execute(
            sa.select(sa.func.count(), sa.func.count(outbox.c.refused_at))
            .select_from(outbox).where(outbox.c.sent_at.is_(None))
        ).one()
    return int(pending), int(refused)
