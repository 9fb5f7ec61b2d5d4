"""The data behind the operator commands: ``status``, ``inspect``, ``dlq list``, ``dlq replay``, ``prune``.

Everything here returns plain dataclasses; :mod:`exactlyonce.cli` renders
them as tables or JSON, and the web console (:mod:`exactlyonce.console`)
as pages and its JSON API: both call the same functions, so they agree.
Nothing here joins a consumer group: the broker is read through
:class:`KafkaReader` (from :mod:`exactlyonce._kafka`, the only part of the
package that imports kafka-python), whose offsets come from a group-less
consumer, so running ``status`` never triggers a rebalance of the workers it
observes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import logs
from exactlyonce import outbox as _outbox
from exactlyonce._kafka import KafkaReader as KafkaReader
from exactlyonce._kafka import client_config as client_config
from exactlyonce._kafka import consumer_settings as consumer_settings
from exactlyonce._kafka import producer_settings as producer_settings
from exactlyonce._kafka import unknown_kafka_settings as unknown_kafka_settings
from exactlyonce.errors import ConfigurationError, ExactlyOnceError
from exactlyonce.ids import DEFAULT_HEADER
from exactlyonce.message import Message
from exactlyonce.producer import Producer
from exactlyonce.runtime import deadletter
from exactlyonce.storage import migrate, store
from exactlyonce.storage.schema import Outcome, counters, outbox, parked, processed, sequence_streams

log = logging.getLogger("exactlyonce.admin")

__all__ = [
    "DeadLetterRecord",
    "Finding",
    "KafkaReader",
    "OutboxStatus",
    "PartitionStatus",
    "ReplayItem",
    "ScopeStatus",
    "Status",
    "inspect",
    "parse_position",
    "read_dead_letters",
    "read_dead_letters_at",
    "redelivery_horizons",
    "replay",
    "replay_to_topics",
    "select_dead_letters",
    "status",
    "status_document",
]


def _iso(value: datetime | None) -> str | None:
    """Naive UTC (as stored) -> ISO-8601 with an explicit offset."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


# -- status -----------------------------------------------------------------


@dataclass
class PartitionStatus:
    """One partition of a scope's topic: the database's counts and the group's position."""

    topic: str
    partition: int
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    parked: int = 0
    #: Records whose ID (or number) came with another payload than the first time.
    fingerprint_mismatches: int = 0
    last_offset: int | None = None
    last_processed_at: datetime | None = None
    committed: int | None = None
    end_offset: int | None = None
    #: Records between the group's committed offset (or the log's beginning,
    #: for a group that never committed) and the end offset; None: unknown.
    lag: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "topic": self.topic, "partition": self.partition, "applied": self.applied,
            "duplicates": self.duplicates, "skipped": self.skipped, "dead_lettered": self.dead_lettered,
            "parked": self.parked, "fingerprint_mismatches": self.fingerprint_mismatches,
            "last_offset": self.last_offset,
            "last_processed_at": _iso(self.last_processed_at), "committed": self.committed,
            "end_offset": self.end_offset, "lag": self.lag,
        }


@dataclass
class ScopeStatus:
    """A handler scope: totals over its partitions, its open sequence gaps, and each partition."""

    scope: str
    group_id: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    #: Sequenced streams waiting for a missing number (``exactlyonce_sequence_streams.gap_since`` set).
    open_gaps: int = 0
    #: Since when the longest-open of those gaps has been open.
    oldest_gap_since: datetime | None = None

    def total(self, name: str) -> int:
        """The sum of one count (``applied``, ``duplicates``, ...) over the partitions."""
        return sum(getattr(p, name) for p in self.partitions)

    @property
    def last_processed_at(self) -> datetime | None:
        """When the scope last decided a record."""
        times = [p.last_processed_at for p in self.partitions if p.last_processed_at is not None]
        return max(times) if times else None

    @property
    def lag(self) -> int | None:
        """The total lag, or ``None`` when any partition's is unknown."""
        lags = [p.lag for p in self.partitions]
        return None if not lags or any(lag is None for lag in lags) else sum(lag for lag in lags if lag is not None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "scope": self.scope, "group_id": self.group_id,
            "applied": self.total("applied"), "duplicates": self.total("duplicates"),
            "skipped": self.total("skipped"), "dead_lettered": self.total("dead_lettered"),
            "parked": self.total("parked"), "fingerprint_mismatches": self.total("fingerprint_mismatches"),
            "open_gaps": self.open_gaps, "oldest_gap_since": _iso(self.oldest_gap_since),
            "last_processed_at": _iso(self.last_processed_at), "lag": self.lag,
            "partitions": [p.to_json() for p in self.partitions],
        }


#: ``status`` lists at most this many refused outbox rows (the count covers all).
MAX_REFUSED_SHOWN = 100


@dataclass
class OutboxStatus:
    """The outbox: rows not yet sent, and the rows the broker refused (each holding back its key)."""

    pending: int
    refused_count: int
    #: The oldest refused rows (at most :data:`MAX_REFUSED_SHOWN`).
    refused: list[_outbox.RefusedRow] = field(default_factory=list)
    #: When the oldest pending row (refused or not) was stored; ``None``: nothing pending.
    oldest_pending_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"pending": self.pending, "oldest_pending_at": _iso(self.oldest_pending_at),
                "refused": self.refused_count, "refused_rows": [r.to_json() for r in self.refused]}


@dataclass
class Status:
    """What ``exactlyonce status`` shows."""

    scopes: list[ScopeStatus]
    #: Why the lag is unknown (broker unreachable, ...); ``None`` when it was read.
    lag_error: str | None = None
    #: ``None`` when the database's outbox table predates refusals (revision 0005).
    outbox: OutboxStatus | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"scopes": [s.to_json() for s in self.scopes], "lag_error": self.lag_error,
                "outbox": None if self.outbox is None else self.outbox.to_json()}


def status_document(result: Status, *, database_url: str, bootstrap_servers: str | None) -> dict[str, Any]:
    """The document ``exactlyonce status --json`` prints (and the console's ``GET /api/status`` returns).

    The database URL is given with its password masked.
    """
    return {"database": logs.redact(database_url), "bootstrap_servers": bootstrap_servers, **result.to_json()}


def outbox_status(engine: Engine) -> OutboxStatus | None:
    """Pending and refused outbox rows; ``None`` if the outbox table is missing or not upgraded."""
    if not sa.inspect(engine).has_table(outbox.name) or _outbox.missing_columns(engine):
        return None
    with engine.connect() as conn:
        pending, refused_count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.count(outbox.c.refused_at), sa.func.min(outbox.c.created_at))
            .select_from(outbox).where(outbox.c.sent_at.is_(None))
        ).one()
    rows = _outbox.refused(engine, limit=MAX_REFUSED_SHOWN) if refused_count else []
    return OutboxStatus(pending=int(pending), refused_count=int(refused_count), refused=rows,
                        oldest_pending_at=oldest)


def status(engine: Engine, reader: KafkaReader | None) -> Status:
    """Per scope: the exact counts of ``exactlyonce_counters``, open gaps, and (with ``reader``) lag; the outbox.

    The counts come from the database alone, so they are shown even when the
    broker is unreachable; the lag then is ``None`` and ``lag_error`` says why.
    The outbox part (:func:`outbox_status`) counts the pending rows and lists
    the refused ones.
    """
    migrate.require_tables(engine, counters, sequence_streams)
    scopes: dict[str, ScopeStatus] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(counters).order_by(counters.c.scope, counters.c.topic, counters.c.kafka_partition)
        ).all()
        gaps = {scope: (int(count), since) for scope, count, since in conn.execute(
            sa.select(sequence_streams.c.scope, sa.func.count(), sa.func.min(sequence_streams.c.gap_since))
            .where(sequence_streams.c.gap_since.is_not(None))
            .group_by(sequence_streams.c.scope)
        ).all()}
    for row in rows:
        scope = scopes.setdefault(row.scope, ScopeStatus(scope=row.scope, group_id=row.group_id))
        scope.partitions.append(PartitionStatus(
            topic=row.topic, partition=row.kafka_partition, applied=row.applied, duplicates=row.duplicates,
            skipped=row.skipped, dead_lettered=row.dead_lettered, parked=row.parked,
            fingerprint_mismatches=row.fingerprint_mismatches, last_offset=row.last_offset,
            last_processed_at=row.last_processed_at,
        ))
    for name, (count, since) in gaps.items():
        scope = scopes.setdefault(name, ScopeStatus(scope=name, group_id=""))
        scope.open_gaps, scope.oldest_gap_since = count, since
    result = Status(scopes=[scopes[name] for name in sorted(scopes)], outbox=outbox_status(engine))
    if reader is None:
        result.lag_error = "no Kafka bootstrap servers given"
        return result
    try:
        _add_lag(result, reader)
    except ExactlyOnceError as exc:
        result.lag_error = str(exc)
    return result


def _add_lag(result: Status, reader: KafkaReader) -> None:
    """Fill committed / end offsets and lag, adding the topic's partitions no record reached yet."""
    for scope in result.scopes:
        if not scope.group_id:
            continue
        for topic in sorted({p.topic for p in scope.partitions}):
            numbers = reader.partitions(topic)
            known = {p.partition for p in scope.partitions if p.topic == topic}
            scope.partitions.extend(PartitionStatus(topic=topic, partition=n) for n in numbers if n not in known)
            end = reader.end_offsets(topic, numbers)
            beginning = reader.beginning_offsets(topic, numbers)
            committed = reader.committed(scope.group_id, topic, numbers)
            for p in scope.partitions:
                if p.topic != topic or p.partition not in end:
                    continue
                p.end_offset = end[p.partition]
                p.committed = committed.get(p.partition)
                start = p.committed if p.committed is not None else beginning.get(p.partition, 0)
                p.lag = max(0, p.end_offset - start)
        scope.partitions.sort(key=lambda p: (p.topic, p.partition))


# -- prune ------------------------------------------------------------------

#: The topic settings :func:`exactlyonce.storage.store.topic_horizon` computes a redelivery horizon from.
HORIZON_SETTINGS = (
    "cleanup.policy",
    "retention.ms",
    "segment.ms",
    "message.timestamp.type",
    "message.timestamp.after.max.ms",
    "message.timestamp.difference.max.ms",
)


_SECOND = timedelta(seconds=1)


def redelivery_horizons(
    reader: KafkaReader,
    topics: Iterable[str],
    *,
    fallback: timedelta = store.DEFAULT_REDELIVERY_HORIZON,
    now: datetime | None = None,
) -> dict[str, store.TopicHorizon]:
    """Each topic's redelivery horizon, from its settings and the age of its oldest record.

    A topic the broker does not know, or whose settings it does not give,
    gets the ``fallback`` horizon, as does one whose oldest record could not
    be read when that is longer than its settings'. An unreachable broker
    raises :class:`~exactlyonce.TransientError`: the caller then falls back
    for every topic and says so.
    """
    now = now or datetime.now(UTC)
    wanted = sorted(set(topics))
    configs = reader.topic_configs(wanted, HORIZON_SETTINGS)
    horizons: dict[str, store.TopicHorizon] = {}
    for topic in wanted:
        settings = configs.get(topic) or {}
        if not settings:
            horizons[topic] = store.fallback_horizon(topic, fallback, "the broker gave no settings for the topic "
                                                       "(unknown topic, or not authorized)")
            continue
        oldest: timedelta | None = None
        problem = None
        try:
            stamps = reader.oldest_timestamps(topic, reader.partitions(topic))
            ages = [now - datetime.fromtimestamp(ms / 1000, UTC) for ms in stamps.values()
                    if ms is not None and ms >= 0]
            # Up to whole seconds (a longer horizon, never a shorter one), so the
            # horizon printed is the one checked: `--older-than` it is accepted.
            oldest = -(-max(ages) // _SECOND) * _SECOND if ages else None
        except ExactlyOnceError as exc:
            problem = f"the oldest record could not be read ({exc})"
        try:
            horizon = store.topic_horizon(topic, settings, oldest)
        except ValueError as exc:
            horizons[topic] = store.fallback_horizon(topic, fallback, f"the broker's settings are incomplete ({exc})")
            continue
        horizons[topic] = horizon if problem is None else store.at_least(horizon, fallback, problem)
    return horizons


# -- inspect ----------------------------------------------------------------


@dataclass
class Finding:
    """What the database knows about one message ID in one scope."""

    scope: str
    #: ``applied``, ``skipped``, ``dead_lettered`` (from exactlyonce_processed) or ``parked``.
    state: str
    topic: str
    partition: int
    offset: int
    fingerprint: str
    at: datetime
    #: For a parked message: its stream and sequence number.
    stream: str | None = None
    number: int | None = None
    #: For a dead-lettered message: where the dead letter went (when known).
    dead_letter_topic: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data: dict[str, Any] = {
            "scope": self.scope, "state": self.state, "topic": self.topic, "partition": self.partition,
            "offset": self.offset, "fingerprint": self.fingerprint,
            ("parked_at" if self.state == "parked" else "processed_at"): _iso(self.at),
        }
        if self.state == "parked":
            data.update(stream=self.stream, number=self.number)
        if self.state == Outcome.DEAD_LETTERED:
            data["dead_letter_topic"] = self.dead_letter_topic
        return data


def inspect(
    engine: Engine,
    message_id: str,
    *,
    scope: str | None = None,
    dead_letter_topics: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Every trace of ``message_id`` (in ``scope``, or in all scopes): its dedup rows and parked rows.

    ``dead_letter_topics`` maps scopes to their handlers' dead-letter topics
    (from a loaded App); without an entry the default ``<topic>.dlq`` is given.
    An empty list means the ID is unknown.
    """
    migrate.require_tables(engine, processed, parked)
    topics = dict(dead_letter_topics or {})
    processed_stmt = sa.select(processed).where(processed.c.message_id == message_id)
    parked_stmt = sa.select(parked).where(parked.c.message_id == message_id)
    if scope is not None:
        processed_stmt = processed_stmt.where(processed.c.scope == scope)
        parked_stmt = parked_stmt.where(parked.c.scope == scope)
    findings: list[Finding] = []
    with engine.connect() as conn:
        for row in conn.execute(processed_stmt.order_by(processed.c.scope)):
            dead = row.outcome == Outcome.DEAD_LETTERED
            findings.append(Finding(
                scope=row.scope, state=row.outcome, topic=row.topic, partition=row.kafka_partition,
                offset=row.kafka_offset, fingerprint=row.fingerprint, at=row.processed_at,
                dead_letter_topic=topics.get(row.scope, f"{row.topic}.dlq") if dead else None,
            ))
        for row in conn.execute(parked_stmt.order_by(parked.c.scope, parked.c.stream, parked.c.number)):
            findings.append(Finding(
                scope=row.scope, state="parked", topic=row.topic, partition=row.kafka_partition,
                offset=row.kafka_offset, fingerprint=row.fingerprint, at=row.parked_at,
                stream=row.stream, number=row.number,
            ))
    return findings


# -- dead letters -----------------------------------------------------------


@dataclass
class DeadLetterRecord:
    """One record of a dead-letter topic, its ``x-exactlyonce-*`` headers decoded."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    #: The record's headers without the ``x-exactlyonce-*`` ones: what a replay sends.
    headers: list[tuple[str, bytes]]
    #: The ``x-exactlyonce-*`` headers, prefix removed (``reason``, ``topic``, ...).
    meta: dict[str, str]

    @property
    def topic(self) -> str | None:
        """The original topic (``None``: the header is missing, the record cannot be replayed)."""
        return self.meta.get("topic") or None

    @property
    def message_id(self) -> str | None:
        """The dedup ID the handler computed, else the original ``message-id`` header."""
        return self.meta.get("message-id") or self.header_message_id

    @property
    def header_message_id(self) -> str | None:
        """The original record's ``message-id`` header, if it had one."""
        found = None
        for name, value in self.headers:
            if name == DEFAULT_HEADER:
                found = value.decode("utf-8", "replace")
        return found or None

    @property
    def original_partition(self) -> int | None:
        """The partition the record was read from (``None``: header missing)."""
        return self._int("partition")

    def _int(self, name: str) -> int | None:
        try:
            return int(self.meta[name])
        except (KeyError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (key and value as UTF-8 text with replacement characters)."""
        return {
            "dlq_partition": self.dlq_partition, "dlq_offset": self.dlq_offset,
            "timestamp": _iso(self.timestamp), "topic": self.topic, "partition": self._int("partition"),
            "offset": self._int("offset"), "message_id": self.message_id, "reason": self.meta.get("reason"),
            "error_type": self.meta.get("error-type"), "error_message": self.meta.get("error-message"),
            "attempts": self._int("attempts"), "scope": self.meta.get("scope"),
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "value": None if self.value is None else self.value.decode("utf-8", "replace"),
        }


def to_dead_letter(record: Message) -> DeadLetterRecord:
    """Decode a record of a dead-letter topic."""
    headers, meta = deadletter.split_headers(record.headers)
    stamp = record.timestamp_ms
    timestamp = None if stamp is None or stamp < 0 else datetime.fromtimestamp(stamp / 1000, UTC)
    return DeadLetterRecord(
        dlq_topic=record.topic, dlq_partition=record.partition, dlq_offset=record.offset, timestamp=timestamp,
        key=record.key, value=record.value, headers=headers, meta=meta,
    )


def read_dead_letters(
    reader: KafkaReader, dlq_topic: str, *, limit: int | None = None, newest: int | None = None
) -> list[DeadLetterRecord]:
    """The records of ``dlq_topic``, oldest first, read without a consumer group.

    ``limit``: the first ``limit`` records read; ``newest``: only the newest ``newest`` records.
    """
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    if newest is not None and newest < 1:
        raise ConfigurationError("--last must be at least 1")
    return [to_dead_letter(record) for record in reader.read_all(dlq_topic, limit=limit, newest=newest)]


def read_dead_letters_at(
    reader: KafkaReader, dlq_topic: str, positions: Iterable[tuple[int, int]]
) -> list[DeadLetterRecord]:
    """The records of ``dlq_topic`` at these ``(partition, offset)`` positions (those that exist)."""
    return [to_dead_letter(record) for record in reader.read_at(dlq_topic, positions)]


def parse_position(text: str) -> tuple[int, int]:
    """``PARTITION@OFFSET`` (as ``dlq list`` shows a dead letter's place) -> ``(partition, offset)``."""
    partition, sep, offset = text.strip().partition("@")
    try:
        if not sep:
            raise ValueError(text)
        position = int(partition), int(offset)
    except ValueError:
        raise ConfigurationError(f"invalid dead-letter position {text!r}: expected PARTITION@OFFSET, "
                                 "as `dlq list` shows it (0@17)") from None
    if min(position) < 0:
        raise ConfigurationError(f"invalid dead-letter position {text!r}: partition and offset cannot be negative")
    return position


def select_dead_letters(
    records: Sequence[DeadLetterRecord],
    *,
    ids: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    reasons: Sequence[str] = (),
    positions: Sequence[tuple[int, int]] = (),
) -> list[DeadLetterRecord]:
    """The records matching every given filter.

    A message ID in ``ids``, a timestamp in [since, until), a reason in
    ``reasons``, a ``(partition, offset)`` in ``positions``.
    """
    wanted = set(ids)
    wanted_reasons = set(reasons)
    wanted_positions = set(positions)
    selected = []
    for record in records:
        if wanted and not ({record.message_id, record.header_message_id} & wanted):
            continue
        if wanted_reasons and record.meta.get("reason") not in wanted_reasons:
            continue
        if wanted_positions and (record.dlq_partition, record.dlq_offset) not in wanted_positions:
            continue
        if since is not None and (record.timestamp is None or record.timestamp < since):
            continue
        if until is not None and (record.timestamp is None or record.timestamp >= until):
            continue
        selected.append(record)
    return selected


@dataclass
class ReplayItem:
    """What a replay did (or, in a dry run, would do) with one dead letter."""

    record: DeadLetterRecord
    #: ``replayed``, ``would-replay`` or ``skipped``.
    action: str
    #: Why it was skipped.
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "dlq_partition": self.record.dlq_partition, "dlq_offset": self.record.dlq_offset,
            "topic": self.record.topic, "message_id": self.record.message_id, "action": self.action,
            "reason": self.reason,
        }


def replay_problem(record: DeadLetterRecord) -> str | None:
    """Why ``record`` cannot usefully be replayed, or ``None``."""
    if not record.topic:
        return f"no {deadletter.HEADER_PREFIX}topic header: the original topic is unknown"
    if record.meta.get("reason") == "bad-signature":
        # A replaying Producer signs with the operator's key (EXACTLYONCE_SIGNING_KEY):
        # that would turn a forged record into a genuine-looking one.
        return "bad-signature: its signature did not verify; a replay could make a forged record look genuine"
    if record.meta.get("reason") == "fingerprint-mismatch":
        # Its ID belongs to another payload: the consumer would dead-letter it again.
        return "fingerprint-mismatch: its message ID belongs to another payload, a replay would be dead-lettered again"
    if "value-truncated" in record.meta:
        # Too large for the dead-letter topic, it was dead-lettered cut down: not the message.
        return "value truncated in the dead letter: replay the original record from its topic instead"
    if not record.header_message_id and not record.meta.get("message-id"):
        # Producer.send would stamp a fresh ID on each replay: two replays, two applications.
        return "no message ID: a replay could not be deduplicated"
    return None


def replay(
    records: Sequence[DeadLetterRecord],
    *,
    engine: Engine | None,
    send: Callable[[DeadLetterRecord, str], None] | None,
    dry_run: bool = False,
    progress: Callable[[], None] | None = None,
) -> list[ReplayItem]:
    """Re-publish ``records`` to their original topics; return what happened to each.

    A dead-lettered message's dedup row (outcome ``dead_lettered``) would make
    the consumer skip the replayed copy as a duplicate, so it is deleted
    first, in its own transaction, and only that row: one whose outcome is
    ``applied`` (an earlier replay got through) stays, and the copy is then
    skipped downstream. Replaying twice therefore applies the message once.
    Deleting before sending errs on the safe side: if the send fails, the row
    is gone but no copy exists, and the next replay sends it.

    ``send(record, message_id)`` publishes one record (the CLI passes an
    :class:`~exactlyonce.Producer`'s ``send``; the caller flushes).
    """
    items: list[ReplayItem] = []
    for record in records:
        problem = replay_problem(record)
        if problem is not None:
            items.append(ReplayItem(record, "skipped", problem))
        elif dry_run:
            items.append(ReplayItem(record, "would-replay"))
        else:
            if engine is None or send is None:
                raise ConfigurationError("a replay needs the database and the broker")
            scope, dedup_id = record.meta.get("scope"), record.meta.get("message-id")
            if scope and dedup_id:
                with engine.begin() as conn:
                    conn.execute(sa.delete(processed).where(
                        processed.c.scope == scope, processed.c.message_id == dedup_id,
                        processed.c.outcome == Outcome.DEAD_LETTERED.value,
                    ))
            send(record, record.header_message_id or dedup_id or "")
            items.append(ReplayItem(record, "replayed"))
        if progress is not None:
            progress()
    return items


def replay_to_topics(
    records: Sequence[DeadLetterRecord],
    *,
    engine: Engine,
    bootstrap_servers: str,
    kafka_config: Mapping[str, Any] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[ReplayItem]:
    """:func:`replay` with a :class:`~exactlyonce.Producer` that sends each record back where it came from.

    What ``exactlyonce dlq replay`` and the console's replay both run. Each
    record goes to its original topic and partition (the original
    producer's partitioning, and so the per-partition order the handler saw,
    is kept even for keyless records) with its key, value and headers. The
    producer does not sign (``sign=False``): the records keep the signature
    their sender gave them, as the MAC covers the message ID, key and value,
    which a replay does not change. Returns after the broker acknowledged
    every send.
    """
    if not records:
        return []
    producer = Producer(bootstrap_servers, sign=False, config=producer_settings(dict(kafka_config or {})))

    def send(record: DeadLetterRecord, message_id: str) -> None:
        producer.send(record.topic or "", record.value or b"", key=record.key, message_id=message_id,
                      headers=record.headers, partition=record.original_partition)

    try:
        items = replay(records, engine=engine, send=send, progress=progress)
        producer.flush()
    finally:
        producer.close()
    return items
