"""Each database gets its own class of dialect operations; any other gets the portable fallback.

The fallback (:class:`~exactlyonce.storage.dialects.Dialect`) serves no
database the suite runs on, so it is tried here on SQLite made to look like
an unknown database: the whole claim, the counters and the stream rows go
through it, and no statement may use SQL of SQLite's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Claim, Message, claim
from exactlyonce.storage import dialects, migrate, store
from exactlyonce.storage import engine as _db
from exactlyonce.storage import sequence as seq
from exactlyonce.storage.dialects import GENERIC, Dialect, MySQL, PostgreSQL, SQLite, dialect_of
from exactlyonce.storage.schema import counters, processed, sequence_streams

SCOPE = "generic:topic"


def _mock(url: str) -> Any:
    return sa.create_mock_engine(url, lambda *args, **kwargs: None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://host/db", PostgreSQL),
        ("sqlite://", SQLite),
        ("mysql+pymysql://host/db", MySQL),
        ("mariadb+pymysql://host/db", MySQL),
    ],
)
def test_each_known_dialect_gets_its_class(url: str, expected: type[Dialect]) -> None:
    engine = sa.create_engine(url)
    assert type(dialect_of(engine)) is expected
    with Session(engine) as session:
        assert type(dialect_of(session)) is expected


@pytest.mark.parametrize("url", ["oracle://", "mssql://"])
def test_any_other_dialect_gets_the_fallback(url: str) -> None:
    assert type(dialect_of(_mock(url))) is Dialect


def test_a_connection_is_looked_up_like_its_engine() -> None:
    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn:
        assert type(dialect_of(conn)) is SQLite


def test_what_the_classes_say_about_savepoints_and_the_relay() -> None:
    """Only MySQL/MariaDB claim without a savepoint; SQLite and the fallback keep the relay's isolation level."""
    assert [c.claims_in_savepoint for c in (Dialect, PostgreSQL, SQLite, MySQL)] == [True, True, True, False]
    assert [c.relay_isolation_level for c in (Dialect, PostgreSQL, SQLite, MySQL)] == [
        None, "READ COMMITTED", None, "READ COMMITTED",
    ]


@pytest.mark.parametrize(("old", "new"), [
    ("schema", "schema"), ("store", "store"), ("sequence", "sequence"), ("migrate", "migrate"), ("_db", "engine"),
])
def test_the_old_module_paths_re_export_the_storage_modules(old: str, new: str) -> None:
    before = importlib.import_module(f"exactlyonce.{old}")
    after = importlib.import_module(f"exactlyonce.storage.{new}")
    public = [name for name in vars(after) if not name.startswith("_")]
    assert public
    for name in public:
        assert getattr(before, name) is getattr(after, name), name


# -- the fallback, on SQLite -------------------------------------------------


@pytest.fixture
def generic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[sa.Engine, list[str]]]:
    """A migrated SQLite database that :func:`dialect_of` takes for an unknown one, and the SQL it is sent."""
    engine = _db.create_engine(f"sqlite:///{tmp_path / 'generic.db'}")
    migrate.upgrade(engine)
    monkeypatch.setitem(dialects.DIALECTS, "sqlite", GENERIC)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *args: statements.append(statement.upper()))
    yield engine, statements
    engine.dispose()


def _no_dialect_sql(statements: list[str]) -> None:
    assert statements
    for statement in statements:
        for own in ("ON CONFLICT", "RETURNING", "UNNEST", "ON DUPLICATE KEY", "INSERT OR"):
            assert own not in statement, statement


def _message(offset: int, value: bytes = b"payload") -> Message:
    return Message(topic="topic", partition=0, offset=offset, key=None, value=value)


def test_the_fallback_claims(generic: tuple[sa.Engine, list[str]]) -> None:
    """NEW once; a rolled-back claim frees the ID; a committed one makes it a DUPLICATE; a batch keeps the new IDs."""
    engine, statements = generic
    assert type(dialect_of(engine)) is Dialect
    with Session(engine) as session:
        assert claim(session, SCOPE, "a", _message(1)) is Claim.NEW
        session.rollback()
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "a", _message(1)) is Claim.NEW
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "a", _message(2)) is Claim.DUPLICATE
        items = [("a", _message(3)), ("b", _message(4)), ("c", _message(5))]
        assert store.claim_many(session, SCOPE, items) == {"b", "c"}
    with Session(engine) as session:
        rows = session.execute(sa.select(processed.c.message_id, processed.c.kafka_offset)
                               .where(processed.c.scope == SCOPE).order_by(processed.c.message_id)).all()
    assert [tuple(row) for row in rows] == [("a", 1), ("b", 4), ("c", 5)]
    assert any("SAVEPOINT" in statement for statement in statements)
    _no_dialect_sql(statements)


def test_the_fallback_raises_an_integrity_error_that_is_not_the_dedup_key(
    generic: tuple[sa.Engine, list[str]],
) -> None:
    engine, statements = generic
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE UNIQUE INDEX uq_generic_coordinates ON {processed.name} "
                             "(topic, kafka_partition, kafka_offset)"))
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "a", _message(1)) is Claim.NEW
    with Session(engine) as session, pytest.raises(sa.exc.IntegrityError), session.begin():
        claim(session, SCOPE, "b", _message(1))
    with Session(engine) as session, session.begin():
        assert claim(session, SCOPE, "b", _message(2)) is Claim.NEW
    _no_dialect_sql(statements)


def test_the_fallback_adds_counts(generic: tuple[sa.Engine, list[str]]) -> None:
    """The first count creates the partition's row, later ones add to it."""
    engine, statements = generic
    for outcomes, offset in ((["applied", "applied", "duplicate"], 7), (["applied", "skipped"], 9)):
        tally = store.Tally()
        for outcome in outcomes:
            tally.add(_message(offset), outcome)
        with Session(engine) as session, session.begin():
            store.count(session, "group", SCOPE, tally)
    with engine.connect() as conn:
        row = conn.execute(sa.select(counters).where(counters.c.scope == SCOPE)).one()
    assert (row.applied, row.duplicates, row.skipped, row.dead_lettered, row.parked) == (3, 1, 1, 0, 0)
    assert (row.group_id, row.last_offset) == ("group", 9)
    _no_dialect_sql(statements)


def test_the_fallback_creates_only_missing_streams(generic: tuple[sa.Engine, list[str]]) -> None:
    """Locking streams creates the missing rows and leaves the existing ones as they are."""
    engine, statements = generic
    with Session(engine) as session, session.begin():
        locked = seq.lock(session, SCOPE, ["s1"], seq.utcnow())
        locked["s1"].watermark = 5
        seq.save(session, SCOPE, locked.values(), seq.utcnow())
    with Session(engine) as session, session.begin():
        locked = seq.lock(session, SCOPE, ["s2", "s1"], seq.utcnow())
        assert {name: stream.watermark for name, stream in locked.items()} == {"s1": 5, "s2": 0}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sequence_streams)).scalar() == 2
    _no_dialect_sql(statements)
