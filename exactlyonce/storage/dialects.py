"""What differs between databases: one small class per dialect.

The framework's statements are portable SQL, except for a few operations a
database does faster or more safely in its own form. Each such operation is a
method of :class:`Dialect`, whose own implementation is the portable fallback,
used for a database exactlyonce has no class for. :class:`PostgreSQL`,
:class:`SQLite` and :class:`MySQL` (MySQL and MariaDB) override what they do
their own way; :func:`dialect_of` picks the class by SQLAlchemy's dialect name.

A claim is never decided by ``rowcount``: with SQLAlchemy 2.1 and psycopg 3
it is -1 for ``INSERT ... ON CONFLICT DO NOTHING``. PostgreSQL and SQLite
report the rows they inserted through ``RETURNING``; MySQL/MariaDB and the
fallback insert one row at a time and read the failure of a duplicate.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session

from exactlyonce.storage.engine import savepoint
from exactlyonce.storage.schema import counters, processed, sequence_streams

#: A dedup row (``processed``), a counters row (``counters``), a stream row (``sequence_streams``).
Row = Mapping[str, Any]

_CLAIM_COLUMNS = (
    "scope", "message_id", "topic", "kafka_partition", "kafka_offset", "fingerprint", "outcome", "processed_at",
)
_PG_CLAIM_MANY = sa.text(
    f"INSERT INTO {processed.name} ({', '.join(_CLAIM_COLUMNS)}) "
    "SELECT * FROM unnest(CAST(:scope AS varchar[]), CAST(:message_id AS varchar[]), "
    "CAST(:topic AS varchar[]), CAST(:kafka_partition AS integer[]), CAST(:kafka_offset AS bigint[]), "
    "CAST(:fingerprint AS varchar[]), CAST(:outcome AS varchar[]), CAST(:processed_at AS timestamp[])) "
    "ON CONFLICT (scope, message_id) DO NOTHING RETURNING message_id"
)

# The same claim with each column of text values sent as ONE string, split by
# PostgreSQL (``string_to_array``): psycopg dumps a Python list into an array
# element by element in Python (a regex test and an escape each), which was
# a fifth of a dedup-only batch's time; ``str.join`` is one C call. The
# values a claim carries never contain the separator (message IDs and stream
# keys refuse control characters; fingerprints are hex; Kafka topic names are
# ``[a-zA-Z0-9._-]``); a claim whose values do falls back to the arrays.
# The columns every row shares go as one value each.
_SEPARATOR = "\x1f"
_PG_CLAIM_JOINED = sa.text(
    f"INSERT INTO {processed.name} ({', '.join(_CLAIM_COLUMNS)}) "
    "SELECT CAST(:scope AS varchar), m, t, CAST(p AS integer), CAST(o AS bigint), f, "
    "CAST(:outcome AS varchar), CAST(:processed_at AS timestamp) "
    "FROM unnest(string_to_array(:message_id, :sep), string_to_array(:topic, :sep), "
    "string_to_array(:kafka_partition, :sep), string_to_array(:kafka_offset, :sep), "
    "string_to_array(:fingerprint, :sep)) AS u(m, t, p, o, f) "
    "ON CONFLICT (scope, message_id) DO NOTHING RETURNING message_id"
)

# SQLite's claim in one statement too: the rows' own values as ONE JSON text
# (``json.dumps``, C) that SQLite unpacks (``json_each``), instead of an
# executemany whose every row SQLAlchemy processes in Python (a third of a
# dedup-only batch's time). ``WHERE true`` keeps SQLite from reading ``ON`` as
# a join's. The timestamp is bound with the column's type, so it is stored as
# SQLAlchemy stores every other one.
_SQLITE_CLAIM_JSON = sa.text(
    f"INSERT INTO {processed.name} ({', '.join(_CLAIM_COLUMNS)}) "
    "SELECT :scope, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), json_extract(value, '$[4]'), :outcome, :processed_at "
    "FROM json_each(:rows) WHERE true "
    "ON CONFLICT (scope, message_id) DO NOTHING RETURNING message_id"
).bindparams(sa.bindparam("processed_at", type_=processed.c.processed_at.type))

# MySQL / MariaDB error code for "Duplicate entry ... for key".
_MYSQL_DUP_ENTRY = 1062
# Its message ends with the key's name: 'PRIMARY' (MariaDB), or qualified by
# the table ('exactlyonce_processed.PRIMARY', MySQL 8).
_MYSQL_DEDUP_KEY = re.compile(rf"for key '(?:{processed.name}\.)?PRIMARY'$")
# PostgreSQL's SQLSTATE unique_violation; the constraint name tells which key.
_PG_UNIQUE_VIOLATION = "23505"
# SQLite names the columns of the violated key.
_SQLITE_DEDUP_KEY = f"UNIQUE constraint failed: {processed.name}.scope, {processed.name}.message_id"


class Dialect:
    """A database exactlyonce has no class for: portable SQL only, the fallback of every operation."""

    #: The SQLAlchemy dialect names this class serves.
    names: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`claim_one` inserts in a savepoint. A database that may
    #: abort the whole transaction on a failed statement needs one.
    claims_in_savepoint: ClassVar[bool] = True
    #: The isolation level of the outbox relay's connections (``None``: the
    #: engine's own); see :func:`exactlyonce.outbox.rows.connect` for why.
    relay_isolation_level: ClassVar[str | None] = None

    def claim(self, session: Session, rows: Sequence[Row]) -> set[str]:
        """Insert the dedup ``rows`` whose key is free; return the message IDs inserted.

        Here one row at a time (:meth:`claim_one`). The rows' message IDs are distinct.
        """
        return {row["message_id"] for row in rows if self.claim_one(session, row)}

    def claim_one(self, session: Session, row: Row) -> bool:
        """Insert one dedup row; ``False`` when the dedup key already holds it (a duplicate).

        An integrity error other than the dedup key's (a NOT NULL, another
        unique index, a trigger's insert) is raised, not taken for a duplicate.
        """
        try:
            if self.claims_in_savepoint:
                with savepoint(session):
                    session.execute(sa.insert(processed).values(row))
            else:
                session.execute(sa.insert(processed).values(row))
        except sa.exc.IntegrityError as exc:
            if self.is_dedup_conflict(session, exc, row):
                return False
            raise
        return True

    def is_dedup_conflict(self, session: Session, exc: sa.exc.IntegrityError, row: Row) -> bool:
        """Whether ``exc`` is the violation of ``processed``'s primary key ``(scope, message_id)``.

        Here, with the failed insert rolled back to its savepoint: a duplicate
        is a row that exists. A locking read sees the latest committed row,
        whatever the isolation level.
        """
        existing = session.execute(
            sa.select(processed.c.message_id)
            .where(processed.c.scope == row["scope"], processed.c.message_id == row["message_id"])
            .with_for_update()
        ).first()
        return existing is not None

    def add_counts(self, session: Session, rows: Sequence[Row], sums: Sequence[str]) -> None:
        """Add ``rows`` to ``counters``: the ``sums`` columns added, the others replaced; missing rows created.

        Here an UPDATE per row, and an INSERT where it changed no row.
        """
        for row in rows:
            key = (
                counters.c.scope == row["scope"],
                counters.c.topic == row["topic"],
                counters.c.kafka_partition == row["kafka_partition"],
            )
            updated: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                sa.update(counters)
                .where(*key)
                .values(
                    **{c: counters.c[c] + row[c] for c in sums},
                    group_id=row["group_id"],
                    last_offset=row["last_offset"],
                    last_processed_at=row["last_processed_at"],
                )
            )
            if not updated.rowcount:
                session.execute(sa.insert(counters).values(row))

    def create_streams(self, session: Session, rows: Sequence[Row]) -> None:
        """Insert the ``sequence_streams`` rows (all of one scope) that do not exist yet; leave the others as they are.

        Here a read of the existing ones, then an INSERT of the rest.
        """
        table = sequence_streams
        existing = set(
            session.execute(
                sa.select(table.c.stream).where(
                    table.c.scope == rows[0]["scope"], table.c.stream.in_([r["stream"] for r in rows])
                )
            ).scalars()
        )
        missing = [row for row in rows if row["stream"] not in existing]
        if missing:
            session.execute(sa.insert(table), missing)


# The counters' upserts are built once per dialect and column set: building one
# per transaction was three quarters of the counting's time in a profile.
@functools.cache
def _on_conflict_upsert(insert_of: Callable[[sa.Table], Any], sums: tuple[str, ...]) -> Any:
    """``INSERT ... ON CONFLICT DO UPDATE`` of the counters (PostgreSQL and SQLite spell it alike)."""
    insert = insert_of(counters)
    return insert.on_conflict_do_update(
        index_elements=["scope", "topic", "kafka_partition"],
        set_={
            **{c: counters.c[c] + insert.excluded[c] for c in sums},
            "group_id": insert.excluded.group_id,
            "last_offset": insert.excluded.last_offset,
            "last_processed_at": insert.excluded.last_processed_at,
        },
    )


@functools.cache
def _on_duplicate_key_upsert(sums: tuple[str, ...]) -> Any:
    """MySQL/MariaDB's counters upsert, built once per column set (as ``_on_conflict_upsert``)."""
    insert = mysql.insert(counters)
    return insert.on_duplicate_key_update(
        {
            **{c: counters.c[c] + insert.inserted[c] for c in sums},
            "group_id": insert.inserted.group_id,
            "last_offset": insert.inserted.last_offset,
            "last_processed_at": insert.inserted.last_processed_at,
        }
    )


class PostgreSQL(Dialect):
    """PostgreSQL: ``ON CONFLICT`` with ``RETURNING``, a whole claim in one statement."""

    names = ("postgresql",)
    relay_isolation_level = "READ COMMITTED"

    def claim(self, session: Session, rows: Sequence[Row]) -> set[str]:
        joined = _joined_claim(rows)
        if joined is not None:
            return set(session.execute(_PG_CLAIM_JOINED, joined).scalars().all())
        # One statement whose shape never changes (arrays of column values):
        # about 10x faster for 500 IDs than a 500-row VALUES list, which
        # SQLAlchemy compiles anew and psycopg binds 4,000 parameters for.
        columns = {name: [row[name] for row in rows] for name in _CLAIM_COLUMNS}
        return set(session.execute(_PG_CLAIM_MANY, columns).scalars())

    def is_dedup_conflict(self, session: Session, exc: sa.exc.IntegrityError, row: Row) -> bool:
        orig: Any = exc.orig
        diag = getattr(orig, "diag", None)
        return (
            getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        ) == _PG_UNIQUE_VIOLATION and getattr(diag, "constraint_name", None) == processed.primary_key.name

    def add_counts(self, session: Session, rows: Sequence[Row], sums: Sequence[str]) -> None:
        session.execute(_on_conflict_upsert(postgresql.insert, tuple(sums)), rows)

    def create_streams(self, session: Session, rows: Sequence[Row]) -> None:
        session.execute(postgresql.insert(sequence_streams).on_conflict_do_nothing(), rows)


def _shared(rows: Sequence[Row]) -> dict[str, Any] | None:
    """The columns every row of a claim shares (scope, outcome, time), or None if some row differs.

    The same value, not only an equal one: two aware datetimes of one
    instant in two time zones are equal, but SQLite stores their wall times.
    """
    first = rows[0]
    scope, outcome, at = first["scope"], first["outcome"], first["processed_at"]
    zone = getattr(at, "tzinfo", None)
    for row in rows:
        if (row["scope"] != scope or row["outcome"] != outcome or row["processed_at"] != at
                or getattr(row["processed_at"], "tzinfo", None) != zone):
            return None
    return {"scope": scope, "outcome": outcome, "processed_at": at}


def _json_claim(rows: Sequence[Row]) -> dict[str, Any] | None:
    """The parameters of ``_SQLITE_CLAIM_JSON`` for ``rows``, or None when they cannot be sent as JSON.

    Not when the rows do not share their scope, outcome and time, and not
    when a text holds NUL: SQLite's ``json_extract`` ends a string at
    ``\\u0000``, which would make ``"a\\x00b"`` the ID ``"a"`` (IDs the
    runtime resolves refuse control characters; ``claim`` and
    ``claim_many`` called directly do not check).
    """
    shared = _shared(rows)
    if shared is None:
        return None
    values = [[row["message_id"], row["topic"], row["kafka_partition"], row["kafka_offset"], row["fingerprint"]]
              for row in rows]
    packed = json.dumps(values, ensure_ascii=False)
    if "\\u0000" in packed:
        return None
    return {**shared, "rows": packed}


def _joined_claim(rows: Sequence[Row]) -> dict[str, Any] | None:
    """The parameters of ``_PG_CLAIM_JOINED`` for ``rows``, or None when they cannot be sent joined.

    Joined only when the shared columns are shared indeed and no value is
    empty or holds the separator (``string_to_array('', sep)`` is an empty
    array: the row would vanish from the claim).
    """
    shared = _shared(rows)
    if shared is None:
        return None
    params: dict[str, Any] = {**shared, "sep": _SEPARATOR}
    for name in ("message_id", "topic", "kafka_partition", "kafka_offset", "fingerprint"):
        values = [row[name] for row in rows]
        if name in ("kafka_partition", "kafka_offset"):
            values = [str(int(value)) for value in values]
        elif not all(isinstance(value, str) and value for value in values):
            return None
        text = _SEPARATOR.join(values)
        if text.count(_SEPARATOR) != len(values) - 1:
            return None
        params[name] = text
    return params


class SQLite(Dialect):
    """SQLite: ``ON CONFLICT`` with ``RETURNING``, a whole claim in one statement (its rows as JSON)."""

    names = ("sqlite",)

    def claim(self, session: Session, rows: Sequence[Row]) -> set[str]:
        params = _json_claim(rows)
        if params is not None:
            return set(session.execute(_SQLITE_CLAIM_JSON, params).scalars().all())
        # executemany with RETURNING: SQLAlchemy's "insertmanyvalues" batches it.
        stmt = (
            sqlite.insert(processed)
            .on_conflict_do_nothing(index_elements=["scope", "message_id"])
            .returning(processed.c.message_id)
        )
        return set(session.execute(stmt, rows).scalars())

    def is_dedup_conflict(self, session: Session, exc: sa.exc.IntegrityError, row: Row) -> bool:
        return str(exc.orig) == _SQLITE_DEDUP_KEY

    def add_counts(self, session: Session, rows: Sequence[Row], sums: Sequence[str]) -> None:
        session.execute(_on_conflict_upsert(sqlite.insert, tuple(sums)), rows)

    def create_streams(self, session: Session, rows: Sequence[Row]) -> None:
        session.execute(sqlite.insert(sequence_streams).on_conflict_do_nothing(), rows)


class MySQL(Dialect):
    """MySQL and MariaDB: a claim row by row, a duplicate told by its error (1062 on the primary key)."""

    names = ("mysql", "mariadb")
    # MySQL rolls back only the failed statement and keeps the transaction.
    claims_in_savepoint = False
    relay_isolation_level = "READ COMMITTED"

    def is_dedup_conflict(self, session: Session, exc: sa.exc.IntegrityError, row: Row) -> bool:
        args: tuple[Any, ...] = getattr(exc.orig, "args", ())
        return (
            len(args) >= 2 and args[0] == _MYSQL_DUP_ENTRY and bool(_MYSQL_DEDUP_KEY.search(str(args[1])))
        )

    def add_counts(self, session: Session, rows: Sequence[Row], sums: Sequence[str]) -> None:
        session.execute(_on_duplicate_key_upsert(tuple(sums)), rows)

    def create_streams(self, session: Session, rows: Sequence[Row]) -> None:
        # "ON DUPLICATE KEY UPDATE scope = scope": a no-op for an existing row.
        # (INSERT IGNORE would also swallow errors other than the duplicate.)
        stmt = mysql.insert(sequence_streams)
        session.execute(stmt.on_duplicate_key_update(scope=sequence_streams.c.scope), rows)


#: The class of each dialect name exactlyonce knows; any other gets :data:`GENERIC`.
DIALECTS: dict[str, Dialect] = {name: cls() for cls in (PostgreSQL, SQLite, MySQL) for name in cls.names}
#: The portable fallback.
GENERIC = Dialect()


def dialect_of(bind: Session | sa.Connection | sa.Engine) -> Dialect:
    """The :class:`Dialect` of the database ``bind`` talks to."""
    name = bind.get_bind().dialect.name if isinstance(bind, Session) else bind.dialect.name
    return DIALECTS.get(name, GENERIC)
