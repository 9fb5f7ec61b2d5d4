"""The outbox table's upkeep: pruning sent rows, and checking that the table is at this version's revision."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import settings
from exactlyonce.errors import ConfigurationError
from exactlyonce.storage.schema import outbox


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete outbox rows sent more than ``older_than`` ago; return how many.

    Pending rows are never deleted. A sent row is not needed to recognise a
    re-send (the consumer's dedup table does that), so there is no horizon to
    respect: the window only decides how long sent rows stay for inspection.
    Rows go in batches of ``batch_size``, each in its own short transaction.
    """
    if older_than < timedelta(0):
        raise ConfigurationError("older_than must not be negative")
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    cutoff = settings.utcnow() - older_than
    deleted = 0
    while True:
        with engine.begin() as conn:
            ids = list(conn.execute(
                sa.select(outbox.c.id).where(outbox.c.sent_at < cutoff).order_by(outbox.c.sent_at).limit(batch_size)
            ).scalars())
            if ids:
                conn.execute(sa.delete(outbox).where(outbox.c.id.in_(ids)))
        deleted += len(ids)
        if progress is not None and ids:
            progress(len(ids))
        if len(ids) < batch_size:
            return deleted


def missing_columns(engine: Engine) -> list[str]:
    """The columns of ``exactlyonce_outbox`` this version uses that the database's table lacks."""
    present = {column["name"] for column in sa.inspect(engine).get_columns(outbox.name)}
    return [column.name for column in outbox.columns if column.name not in present]


def require_columns(engine: Engine) -> None:
    """Raise :class:`ConfigurationError` if the outbox table predates this version (run ``db upgrade``)."""
    missing = missing_columns(engine)
    if missing:
        raise ConfigurationError(
            f"table {outbox.name} lacks column(s) {', '.join(missing)}: the database is not at the framework's "
            "current revision; run `exactlyonce db upgrade` first"
        )
