"""The one-statement claims of PostgreSQL and SQLite must claim exactly what the row-by-row forms did.

``PostgreSQL.claim`` joins a claim's message IDs (and topics, partitions,
offsets, fingerprints) with a separator no valid value holds and lets the
server split them (``string_to_array``), instead of having psycopg dump a
Python list per column. ``SQLite.claim`` sends the rows as one JSON text that
SQLite unpacks (``json_each``), instead of an executemany. Generated claims,
with IDs full of what quoting, splitting and JSON get wrong (commas, quotes,
braces, backslashes, ``NULL``, spaces, non-ASCII), some of them claimed
before: the fast path must be the one taken, return exactly the IDs not
claimed before, and store every value as the row-by-row form stores it.
Values it cannot carry fall back to the older form and still claim.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from exactlyonce import Message
from exactlyonce.ids import MAX_MESSAGE_ID_LENGTH, text_problem
from exactlyonce.storage import dialects, store
from exactlyonce.storage.schema import Outcome, processed

from .helpers import engine_for

BOTH = pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)

NOW = datetime(2026, 12, 2, 12, 0, 0, 123456)

#: IDs a sender may give (``ids.text_problem`` accepts them), biased towards
#: what array literals and string splitting get wrong.
VALID_IDS = st.text(
    alphabet=st.one_of(st.sampled_from(list(',"\'{}\\ ;:|NUL@\u00e9\u4e2d\U0001f600')), st.characters(
        blacklist_categories=("Cc", "Cs"))),
    min_size=1, max_size=40,
).filter(lambda text: text_problem(text, MAX_MESSAGE_ID_LENGTH) is None) | st.sampled_from(
    ["NULL", "null", "{}", '""', " ", "a,b", "{a,b}", "\\", "x" * MAX_MESSAGE_ID_LENGTH])

_scopes = itertools.count()


def _rows(scope: str, ids: list[str], topic: str = "transfers", now: datetime = NOW) -> list[dict[str, Any]]:
    return [
        store._row(scope, message_id, Message(topic=topic, partition=n % 7, offset=2**40 + n, key=None,
                                              value=message_id.encode()), Outcome.APPLIED, now)
        for n, message_id in enumerate(ids)
    ]


def _stored(engine: sa.Engine, scope: str) -> set[tuple[Any, ...]]:
    columns = [processed.c[name] for name in dialects._CLAIM_COLUMNS]
    with engine.connect() as conn:
        return {tuple(row) for row in conn.execute(sa.select(*columns).where(processed.c.scope == scope))}


def _as_stored(rows: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {tuple(row[name] for name in dialects._CLAIM_COLUMNS) for row in rows}


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = engine_for(database_url)
    yield engine
    engine.dispose()


def _fast_path_taken(engine: sa.Engine, rows: list[dict[str, Any]]) -> bool:
    if engine.dialect.name == "postgresql":
        return dialects._joined_claim(rows) is not None
    return dialects._json_claim(rows) is not None


@BOTH
def test_the_one_statement_claim_claims_what_the_rows_claim(engine: sa.Engine) -> None:
    dialect = dialects.dialect_of(engine)
    assert isinstance(dialect, (dialects.PostgreSQL, dialects.SQLite))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ids=st.lists(VALID_IDS, min_size=1, max_size=30, unique=True), data=st.data())
    def check(ids: list[str], data: st.DataObject) -> None:
        scope = f"joined:{next(_scopes)}"
        before = data.draw(st.lists(st.sampled_from(ids), unique=True), label="claimed before")
        rows = _rows(scope, ids)
        by_id = {row["message_id"]: row for row in rows}
        if before:
            with Session(engine) as session, session.begin():
                assert dialect.claim(session, [by_id[i] for i in before]) == set(before)
        # The fast path is the one taken for these values (the fallback would pass this test too).
        assert _fast_path_taken(engine, rows)
        with Session(engine) as session, session.begin():
            assert dialect.claim(session, rows) == set(ids) - set(before)
        assert _stored(engine, scope) == _as_stored(rows)

    check()


@pytest.mark.parametrize(("database_url", "spoil"), [
    ("postgresql", "separator in an ID"), ("postgresql", "empty ID"), ("postgresql", "separator in a topic"),
    ("postgresql", "two scopes"), ("postgresql", "one instant in two time zones"),
    # SQLite's json_extract ends a string at NUL: "b\x00c" would be claimed as "b".
    ("sqlite", "NUL in an ID"), ("sqlite", "NUL in a topic"),
    ("sqlite", "two scopes"), ("sqlite", "one instant in two time zones"),
], indirect=["database_url"])
def test_values_the_fast_claim_cannot_carry_fall_back(engine: sa.Engine, spoil: str) -> None:
    """(Such IDs are refused before a worker claims them; ``claim`` called directly does not check.)"""
    scope = f"fallback:{next(_scopes)}"
    second = {"separator in an ID": "b\x1fc", "NUL in an ID": "b\x00c"}.get(spoil, "b")
    ids = ["a", second, "" if spoil == "empty ID" else "d"]
    topic = {"separator in a topic": "to\x1fpic", "NUL in a topic": "to\x00pic"}.get(spoil, "transfers")
    rows = _rows(scope, ids, topic=topic)
    if spoil == "two scopes":
        rows[1]["scope"] = f"{scope}-other"
    if spoil == "one instant in two time zones":
        utc = NOW.replace(tzinfo=UTC)
        rows[0]["processed_at"] = utc
        for row in rows[1:]:
            row["processed_at"] = utc.astimezone(timezone(timedelta(hours=5)))
    assert not _fast_path_taken(engine, rows)
    with Session(engine) as session, session.begin():
        assert dialects.dialect_of(engine).claim(session, rows) == set(ids)
    if spoil != "one instant in two time zones":  # (stored naive, as the database reads them)
        stored = _stored(engine, scope) | _stored(engine, f"{scope}-other")
        assert stored == _as_stored(rows)


@BOTH
def test_both_forms_store_the_same_raw_values(engine: sa.Engine) -> None:
    """As the database holds them (no SQLAlchemy type processing on the way back): SQLite's timestamps are text.

    (A whole second: sqlite3's own datetime adapter would drop the ``.000000`` SQLAlchemy writes.)
    """
    fast, slow = f"raw:{next(_scopes)}", f"raw:{next(_scopes)}"
    whole_second = NOW.replace(microsecond=0)
    fast_rows = _rows(fast, ["x", "y"], now=whole_second)
    slow_rows = _rows(slow, ["x", "y"], now=whole_second)
    slow_rows[1]["scope"] = f"{slow}-other"
    assert _fast_path_taken(engine, fast_rows) and not _fast_path_taken(engine, slow_rows)
    for rows in (fast_rows, slow_rows):
        with Session(engine) as session, session.begin():
            assert dialects.dialect_of(engine).claim(session, rows) == {"x", "y"}
    columns = ", ".join(name for name in dialects._CLAIM_COLUMNS if name != "scope")
    raw = sa.text(f"SELECT {columns} FROM {processed.name} WHERE scope LIKE :scope ORDER BY message_id")
    with engine.connect() as conn:
        assert [tuple(row) for row in conn.execute(raw, {"scope": f"{fast}%"})] == [
            tuple(row) for row in conn.execute(raw, {"scope": f"{slow}%"})]
