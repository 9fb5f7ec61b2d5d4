"""The framework's tables: the only place they are defined.

The runtime and the Alembic migrations (``migrations/``) both import this
module; a test upgrades an empty database and checks it matches :data:`metadata`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, Text, text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from exactlyonce.ids import MAX_MESSAGE_ID_LENGTH
from exactlyonce.outcome import Outcome as _Outcome

#: Kafka limits topic names to 249 characters.
MAX_TOPIC_LENGTH = 249
#: Scope names (``<group_id>:<topic>`` by default) must fit this column.
MAX_SCOPE_LENGTH = 200

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    }
)


class ExactString(TypeDecorator[str]):
    """A VARCHAR that the database compares byte for byte.

    MySQL and MariaDB compare text with the column's collation, by default
    case- and accent-insensitive: "Order-1" would be a duplicate of "order-1"
    and a new message would be skipped. There the column gets a binary,
    no-pad collation (trailing spaces count too). PostgreSQL's and SQLite's
    default comparisons are already exact.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            collation = "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
            return dialect.type_descriptor(mysql.VARCHAR(self.length, charset="utf8mb4", collation=collation))
        return self.impl_instance


#: What ``exactlyonce_processed.outcome`` holds: ``applied``, ``skipped`` or
#: ``dead_lettered`` (the outcomes that claim a message ID).
Outcome = _Outcome


#: One row per (scope, message ID) ever handled. The primary key is the dedup
#: decision: whoever inserts the row first owns the message.
processed = Table(
    "exactlyonce_processed",
    metadata,
    Column("scope", ExactString(MAX_SCOPE_LENGTH), primary_key=True),
    Column("message_id", ExactString(MAX_MESSAGE_ID_LENGTH), primary_key=True),
    Column("topic", String(MAX_TOPIC_LENGTH), nullable=False),
    Column("kafka_partition", Integer, nullable=False),
    Column("kafka_offset", BigInteger, nullable=False),
    # SHA-256 hex of the record value: tells a re-send from an ID reused for a
    # different payload.
    Column("fingerprint", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    # Naive UTC: the same on every dialect (MySQL's DATETIME has no zone).
    Column("processed_at", DateTime(timezone=False), nullable=False),
    # Retention pruning deletes the oldest rows first.
    Index("ix_exactlyonce_processed_processed_at", "processed_at"),
)


#: Messages published with :func:`exactlyonce.publish`, in the publishing
#: transaction; the relay sends the pending ones (``sent_at`` NULL) in ``id``
#: order and sets ``sent_at``.
outbox = Table(
    "exactlyonce_outbox",
    metadata,
    # SQLite autoincrements only an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("topic", String(MAX_TOPIC_LENGTH), nullable=False),
    # MySQL's BLOB and TEXT stop at 64 KiB; a Kafka record may be larger.
    Column("key", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=True),
    Column("value", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
    # JSON text: a list of [name, base64 of the value], in the record's order.
    Column("headers", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False),
    Column("message_id", ExactString(MAX_MESSAGE_ID_LENGTH), nullable=False),
    # SHA-256 hex of (topic, key): the rows that must reach Kafka in id order
    # share it. A key is bytes of any length, which MySQL cannot index or
    # compare without a prefix length; the digest indexes everywhere.
    Column("ordering_key", String(64), nullable=False),
    Column("created_at", DateTime(timezone=False), nullable=False),
    Column("sent_at", DateTime(timezone=False), nullable=True),
    # Set when the broker refused the row for good (too large, topic not
    # authorised, ...); the row stays pending but is not sent again, and the
    # later rows of its ordering key wait behind it, until an operator
    # releases it (``exactlyonce outbox release``) or discards it.
    Column("refused_at", DateTime(timezone=False), nullable=True),
    # Why: the broker's error, as the relay met it.
    Column("refusal", Text, nullable=True),
    # The pending scan (sent_at IS NULL ORDER BY id) and pruning (oldest sent_at first).
    Index("ix_exactlyonce_outbox_sent_at_id", "sent_at", "id"),
    # "Is an earlier row of this ordering key still pending?" without reading
    # the key's sent rows.
    Index("ix_exactlyonce_outbox_ordering_key_sent_at_id", "ordering_key", "sent_at", "id"),
    # The refused rows (few) without scanning the pending ones.
    Index("ix_exactlyonce_outbox_refused_at", "refused_at"),
)


#: Stream keys returned by a handler's ``sequence`` callable must fit this column.
MAX_STREAM_LENGTH = 255

#: One row per (scope, stream) of a sequenced handler: every number up to
#: ``watermark`` has been handled, in order. Storage is one row per stream,
#: not one per message.
sequence_streams = Table(
    "exactlyonce_sequence_streams",
    metadata,
    Column("scope", ExactString(MAX_SCOPE_LENGTH), primary_key=True),
    Column("stream", ExactString(MAX_STREAM_LENGTH), primary_key=True),
    Column("watermark", BigInteger, nullable=False),
    # How many of the stream's messages wait in exactlyonce_parked.
    Column("parked", Integer, nullable=False),
    # Since when the stream has waited for number watermark + 1 with messages
    # parked behind it (NULL: no gap).
    Column("gap_since", DateTime(timezone=False), nullable=True),
    Column("updated_at", DateTime(timezone=False), nullable=False),
    Index("ix_exactlyonce_sequence_streams_gap_since", "gap_since"),
)

#: Messages of a sequenced handler that arrived ahead of their turn, kept in
#: the transaction that read them until the gap before them fills.
parked = Table(
    "exactlyonce_parked",
    metadata,
    Column("scope", ExactString(MAX_SCOPE_LENGTH), primary_key=True),
    Column("stream", ExactString(MAX_STREAM_LENGTH), primary_key=True),
    Column("number", BigInteger, primary_key=True),
    Column("message_id", ExactString(MAX_MESSAGE_ID_LENGTH), nullable=False),
    Column("topic", String(MAX_TOPIC_LENGTH), nullable=False),
    Column("kafka_partition", Integer, nullable=False),
    Column("kafka_offset", BigInteger, nullable=False),
    Column("key", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=True),
    Column("value", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=True),
    # JSON text: a list of [name, base64 of the value], as in the outbox.
    Column("headers", Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False),
    Column("timestamp_ms", BigInteger, nullable=True),
    Column("fingerprint", String(64), nullable=False),
    Column("parked_at", DateTime(timezone=False), nullable=False),
)

#: What each handler scope decided, per partition, counted in the same
#: transactions that made the decisions (so the counts are exact): read by
#: ``exactlyonce status``. A partition is owned by one worker at a time, so
#: the rows are not contended.
counters = Table(
    "exactlyonce_counters",
    metadata,
    Column("scope", ExactString(MAX_SCOPE_LENGTH), primary_key=True),
    Column("topic", String(MAX_TOPIC_LENGTH), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True),
    Column("group_id", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("applied", BigInteger, nullable=False),
    Column("duplicates", BigInteger, nullable=False),
    Column("skipped", BigInteger, nullable=False),
    Column("dead_lettered", BigInteger, nullable=False),
    Column("parked", BigInteger, nullable=False),
    Column("fingerprint_mismatches", BigInteger, nullable=False, server_default=text("0")),
    Column("last_offset", BigInteger, nullable=True),
    Column("last_processed_at", DateTime(timezone=False), nullable=True),
)
