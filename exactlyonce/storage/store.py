"""The dedup store: claim a message ID inside the caller's transaction.

``claim`` inserts the ``(scope, message_id)`` row *before* the handler runs.
The primary key decides the winner, not a read-then-write check: when two
consumers hold the same message at once (a rebalance, a zombie), the second
INSERT waits on the first transaction's row lock; it then sees a conflict if
the first committed (DUPLICATE), or inserts if the first rolled back (NEW).

``rowcount`` is not used to decide: with SQLAlchemy 2.1 and psycopg 3 it is -1
for ``INSERT ... ON CONFLICT DO NOTHING``. PostgreSQL and SQLite report the
insert through ``RETURNING``; MySQL/MariaDB through the duplicate-key error
on the primary key (any other integrity error is an error, not a duplicate).
Each database's statements are in :mod:`exactlyonce.storage.dialects`.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from exactlyonce._duration import format_duration as format_duration  # importable from here, as before
from exactlyonce.errors import ConfigurationError
from exactlyonce.message import Message
from exactlyonce.outcome import Outcome
from exactlyonce.settings import utcnow
from exactlyonce.storage.dialects import dialect_of
from exactlyonce.storage.schema import processed


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
    new = claim_many(session, scope, [(message_id, message)], outcome=outcome)
    return Claim.NEW if message_id in new else Claim.DUPLICATE


def claim_many(
    session: Session,
    scope: str,
    items: Sequence[tuple[str, Message]],
    *,
    outcome: Outcome = Outcome.APPLIED,
) -> set[str]:
    """Claim several message IDs at once; return the IDs this transaction now owns.

    PostgreSQL and SQLite claim the whole list in one statement. IDs must be
    distinct (the caller keeps the first occurrence of a repeated ID).
    """
    if not items:
        return set()
    now = utcnow()
    rows = [_row(scope, message_id, message, outcome, now) for message_id, message in items]
    return dialect_of(session).claim(session, rows)


def _row(scope: str, message_id: str, message: Message, outcome: Outcome, now: datetime) -> dict[str, Any]:
    return {
        "scope": scope,
        "message_id": message_id,
        "topic": message.topic,
        "kafka_partition": message.partition,
        "kafka_offset": message.offset,
        "fingerprint": message.fingerprint(),
        "outcome": outcome.value,
        "processed_at": now,
    }


def stored_fingerprints(session: Session, scope: str, message_ids: Iterable[str]) -> dict[str, str]:
    """Return the stored payload fingerprint of each of ``message_ids`` that has a row."""
    ids = list(message_ids)
    if not ids:
        return {}
    rows = session.execute(
        sa.select(processed.c.message_id, processed.c.fingerprint).where(
            processed.c.scope == scope, processed.c.message_id.in_(ids)
        )
    )
    return {message_id: fingerprint for message_id, fingerprint in rows}


#: The redelivery horizon assumed for a topic whose settings the broker did not
#: give (``--horizon``'s default): Kafka's defaults, ``retention.ms`` (7 days)
#: + ``segment.ms`` (7 days) + ``message.timestamp.after.max.ms`` (1 hour from
#: Kafka 4.0), rounded up to a day.
DEFAULT_REDELIVERY_HORIZON = timedelta(days=15)

#: How :func:`topic_horizon` computes a topic's redelivery horizon (printed by ``prune --json``).
HORIZON_RULE = (
    "per topic of the rows to delete: max(retention.ms + segment.ms, age of the oldest record still in any "
    "partition) + message.timestamp.after.max.ms (CreateTime topics); no bound for cleanup.policy=compact, "
    "retention.ms=-1 or unlimited future timestamps; --horizon for a topic whose settings the broker did not give"
)

#: Kafka writes "forever" as Long.MAX_VALUE milliseconds; anything past what a
#: timedelta holds (about 2.7 million years) is taken as no bound at all.
_UNBOUNDED_MS = timedelta.max // timedelta(milliseconds=1)


@dataclass(frozen=True)
class TopicHorizon:
    """How long a record of ``topic`` can be read again: its dedup rows must live at least this long."""

    topic: str
    #: ``None``: no bound (compacted topic, infinite retention, unlimited future timestamps).
    horizon: timedelta | None
    #: ``broker`` (computed from the topic's settings) or ``fallback`` (``--horizon``).
    source: str
    #: How the horizon was arrived at, in words.
    reason: str
    #: The topic settings it was computed from, as the broker gave them.
    settings: Mapping[str, str | None] = field(default_factory=dict)
    #: The age of the oldest record still in the topic (``None``: empty, or not read).
    oldest_record_age: timedelta | None = None

    @property
    def text(self) -> str:
        """The horizon for people: ``14d1h``, or ``unbounded``."""
        return "unbounded" if self.horizon is None else format_duration(self.horizon)

    def allows(self, older_than: timedelta) -> bool:
        """Whether deleting rows older than ``older_than`` stays outside the horizon."""
        return self.horizon is not None and older_than >= self.horizon

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        age = self.oldest_record_age
        return {
            "topic": self.topic,
            "horizon_seconds": None if self.horizon is None else self.horizon.total_seconds(),
            "horizon": self.text,
            "source": self.source,
            "reason": self.reason,
            "settings": dict(self.settings),
            "oldest_record_age_seconds": None if age is None else age.total_seconds(),
        }


def fallback_horizon(topic: str, horizon: timedelta, why: str) -> TopicHorizon:
    """``topic``'s horizon when the broker did not give its settings: the explicit ``horizon``."""
    return TopicHorizon(topic, horizon, "fallback", f"--horizon {format_duration(horizon)}: {why}")


def _ms(settings: Mapping[str, str | None], name: str) -> int:
    value = settings.get(name)
    if value is None:
        raise ValueError(f"{name} not given")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of milliseconds") from None


def topic_horizon(
    topic: str,
    settings: Mapping[str, str | None],
    oldest_record_age: timedelta | None = None,
) -> TopicHorizon:
    """The redelivery horizon of ``topic`` from its settings (values as ``describe_configs`` gives them).

    Kafka deletes whole segments, and a segment only once its newest record
    is older than ``retention.ms``; a segment takes new records for up to
    ``segment.ms`` before it rolls, so a record stays readable for up to
    ``retention.ms + segment.ms``, and for as long as the oldest record now in
    the log shows it can. A CreateTime record may carry a timestamp up to
    ``message.timestamp.after.max.ms`` in the future, which keeps its segment
    (and makes a record look younger than it is) for that much longer. A
    compacted topic keeps each key's latest record, and ``retention.ms=-1``
    every record, forever: no bound.

    Raises ``ValueError`` when a setting the rule needs is missing or unreadable.
    """
    def unbounded(why: str) -> TopicHorizon:
        return TopicHorizon(topic, None, "broker", why, settings, oldest_record_age)

    policy = settings.get("cleanup.policy")
    if policy is None:
        raise ValueError("cleanup.policy not given")
    if "compact" in {p.strip().lower() for p in policy.split(",")}:
        return unbounded(f"cleanup.policy={policy}: compaction keeps each key's latest record forever")
    retention_ms = _ms(settings, "retention.ms")
    if retention_ms < 0:
        return unbounded(f"retention.ms={retention_ms}: records are kept forever")
    segment_ms = _ms(settings, "segment.ms")
    future_ms, future_name = 0, ""
    if (settings.get("message.timestamp.type") or "CreateTime") == "CreateTime":
        # Brokers before 3.6 only have the symmetric message.timestamp.difference.max.ms.
        names = ("message.timestamp.after.max.ms", "message.timestamp.difference.max.ms")
        future_name = next((name for name in names if settings.get(name) is not None), "")
        future_ms = _ms(settings, future_name) if future_name else 0
        if future_ms >= _UNBOUNDED_MS:
            return unbounded(f"{future_name} is unlimited: a record may carry a timestamp far in the future, "
                             "which keeps its segment until then")
    if retention_ms + segment_ms + future_ms >= _UNBOUNDED_MS:
        return unbounded(f"retention.ms={retention_ms} + segment.ms={segment_ms} is beyond any bound")
    retention = timedelta(milliseconds=retention_ms)
    segment = timedelta(milliseconds=segment_ms)
    future = timedelta(milliseconds=future_ms)
    base = retention + segment
    reason = f"retention.ms {format_duration(retention)} + segment.ms {format_duration(segment)}"
    if oldest_record_age is not None:
        # A record stamped in the future is not "negative" old; the allowance below covers it.
        oldest_record_age = max(oldest_record_age, timedelta(0))
        reason = f"max({reason}, oldest record {format_duration(oldest_record_age)} old)"
        base = max(base, oldest_record_age)
    if future:
        reason += f" + {future_name} {format_duration(future)}"
    return TopicHorizon(topic, base + future, "broker", reason, settings, oldest_record_age)


def at_least(horizon: TopicHorizon, floor: timedelta, why: str) -> TopicHorizon:
    """``horizon`` raised to ``floor`` (when part of what it rests on could not be read)."""
    if horizon.horizon is None or horizon.horizon >= floor:
        return replace(horizon, reason=f"{horizon.reason}; {why}")
    return replace(horizon, horizon=floor, reason=f"{horizon.reason}, raised to --horizon "
                   f"{format_duration(floor)}: {why}")


def topics_to_prune(engine: Engine, older_than: timedelta) -> list[str]:
    """The topics of the dedup rows processed more than ``older_than`` ago: those a prune would touch."""
    cutoff = utcnow() - older_than
    with engine.connect() as conn:
        return sorted(conn.execute(
            sa.select(processed.c.topic).where(processed.c.processed_at < cutoff).distinct()
        ).scalars())


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    horizon: timedelta = DEFAULT_REDELIVERY_HORIZON,
    horizons: Mapping[str, TopicHorizon] | None = None,
    force: bool = False,
    batch_size: int = 1000,
    pause: timedelta = timedelta(0),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete dedup rows processed more than ``older_than`` ago; return how many.

    A row must outlive every way its record can come back: the record's life
    in the Kafka log (its topic's redelivery horizon, see
    :func:`topic_horizon`) and any producer re-send. Each topic among the rows
    to delete is checked against ``horizons[topic]`` (computed from the
    broker's settings, :func:`exactlyonce.admin.redelivery_horizons`), or
    against ``horizon`` for a topic not in it. A window inside any of them is
    refused unless ``force``: a redelivered record whose row is gone is
    applied again.

    Rows go in batches of ``batch_size``, each in its own short transaction
    (with ``pause`` between batches), so consumers claiming at the same time
    are never blocked for long.
    """
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    if not force:
        known = dict(horizons or {})
        for topic in topics_to_prune(engine, older_than):
            limit = known.get(topic) or fallback_horizon(topic, horizon, "the broker's settings were not read")
            if not limit.allows(older_than):
                raise ConfigurationError(
                    f"refusing to prune rows of topic {topic!r} younger than its redelivery horizon ({limit.text}; "
                    f"{limit.reason}): a record still in the Kafka log could be redelivered and applied again "
                    "(override with --force, or force=True)"
                )
    cutoff = utcnow() - older_than
    key = sa.tuple_(processed.c.scope, processed.c.message_id)
    deleted = 0
    while True:
        with engine.begin() as conn:
            keys = conn.execute(
                sa.select(processed.c.scope, processed.c.message_id)
                .where(processed.c.processed_at < cutoff)
                .order_by(processed.c.processed_at)
                .limit(batch_size)
            ).all()
            if keys:
                conn.execute(sa.delete(processed).where(key.in_([tuple(k) for k in keys])))
        deleted += len(keys)
        if progress is not None and keys:
            progress(len(keys))
        if len(keys) < batch_size:
            return deleted
        if pause:
            time.sleep(pause.total_seconds())


class Tally:
    """Outcomes per partition, to be added to ``exactlyonce_counters`` by :func:`count`."""

    def __init__(self) -> None:
        self._outcomes: dict[tuple[str, int], Counter[Outcome]] = {}
        self._last_offset: dict[tuple[str, int], int] = {}

    def add(self, message: Message, outcome: Outcome | str, n: int = 1) -> None:
        """Count ``outcome`` (an :class:`~exactlyonce.outcome.Outcome`) for ``message``'s partition."""
        if outcome.__class__ is not Outcome:
            outcome = Outcome(outcome)
        tp = (message.topic, message.partition)
        outcomes = self._outcomes.get(tp)
        if outcomes is None:
            outcomes = self._outcomes[tp] = Counter()
        outcomes[outcome] += n
        self._last_offset[tp] = max(self._last_offset.get(tp, -1), message.offset)

    def rows(self, group_id: str, scope: str, now: datetime) -> list[dict[str, Any]]:
        return [
            {
                "scope": scope,
                "topic": topic,
                "kafka_partition": partition,
                "group_id": group_id,
                **{outcome.column: outcomes[outcome] for outcome in Outcome},
                "last_offset": self._last_offset[(topic, partition)],
                "last_processed_at": now,
            }
            for (topic, partition), outcomes in sorted(self._outcomes.items())
        ]


def count(session: Session, group_id: str, scope: str, tally: Tally) -> None:
    """Add ``tally`` to the scope's per-partition counters, in the session's transaction.

    Called by the transaction that decided the outcomes, so a rolled-back
    decision is never counted and a committed one always is.
    """
    rows = tally.rows(group_id, scope, utcnow())
    if not rows:
        return
    dialect_of(session).add_counts(session, rows, [outcome.column for outcome in Outcome])
