"""PostgreSQL's claim sends each column as one joined string: it must claim exactly what the arrays did.

``PostgreSQL.claim`` joins a claim's message IDs (and topics, partitions,
offsets, fingerprints) with a separator no valid value holds and lets the
server split them (``string_to_array``), instead of having psycopg dump a
Python list per column. Generated claims, with IDs full of what quoting and
splitting get wrong (commas, quotes, braces, backslashes, ``NULL``, spaces,
non-ASCII), and some of them claimed before: the joined path must be the one
taken, return exactly the IDs not claimed before, and store every value as
given. Values it cannot carry fall back to the arrays and still claim.
"""

from __future__ import annotations

import itertools
from datetime import datetime
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

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

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


def _rows(scope: str, ids: list[str], topic: str = "transfers") -> list[dict[str, Any]]:
    return [
        store._row(scope, message_id, Message(topic=topic, partition=n % 7, offset=2**40 + n, key=None,
                                              value=message_id.encode()), Outcome.APPLIED, NOW)
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


def test_the_joined_claim_claims_what_the_arrays_claim(engine: sa.Engine) -> None:
    dialect = dialects.dialect_of(engine)
    assert isinstance(dialect, dialects.PostgreSQL)

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
        # The joined path is the one taken for these values (the fallback would pass this test too).
        assert dialects._joined_claim(rows) is not None
        with Session(engine) as session, session.begin():
            assert dialect.claim(session, rows) == set(ids) - set(before)
        assert _stored(engine, scope) == _as_stored(rows)

    check()


@pytest.mark.parametrize("spoil", ["separator in an ID", "empty ID", "two scopes", "separator in a topic"])
def test_values_the_joined_claim_cannot_carry_fall_back_to_the_arrays(engine: sa.Engine, spoil: str) -> None:
    scope = f"fallback:{next(_scopes)}"
    ids = ["a", "b\x1fc" if spoil == "separator in an ID" else "b", "" if spoil == "empty ID" else "d"]
    rows = _rows(scope, ids, topic="to\x1fpic" if spoil == "separator in a topic" else "transfers")
    if spoil == "two scopes":
        rows[1]["scope"] = f"{scope}-other"
    assert dialects._joined_claim(rows) is None
    with Session(engine) as session, session.begin():
        assert dialects.dialect_of(engine).claim(session, rows) == set(ids)
    stored = _stored(engine, scope) | _stored(engine, f"{scope}-other")
    assert stored == _as_stored(rows)
