"""The session lent to a handler: it cannot end the runner's transaction (SQLite, no services)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, _db, _session


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = _db.create_engine(f"sqlite:///{tmp_path / 'session.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    yield engine
    engine.dispose()


def _rows(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [x for (x,) in conn.exec_driver_sql("SELECT x FROM t ORDER BY x")]


def _transaction(engine: sa.Engine, handler: Callable[[Any, Session], Any]) -> None:
    """What the runner does: a write, the handler, a write, one commit."""
    with _session.HandlerSession(engine) as session, session.begin():
        session.execute(sa.text("INSERT INTO t VALUES (1)"))
        _session.call(handler, None, session, "g:t")
        session.execute(sa.text("INSERT INTO t VALUES (3)"))


@pytest.mark.parametrize("method", ["commit", "rollback", "close", "reset", "invalidate"])
def test_ending_the_session_is_refused_and_rolls_back(engine: sa.Engine, method: str) -> None:
    """session.commit() and friends raise a ConfigurationError in a handler; nothing is committed."""

    def handler(message: Any, session: Session) -> None:
        session.execute(sa.text("INSERT INTO t VALUES (2)"))
        getattr(session, method)()

    with pytest.raises(ConfigurationError, match=rf"must not call session\.{method}\(\)"):
        _transaction(engine, handler)
    assert _rows(engine) == []


@pytest.mark.parametrize("method", ["commit", "rollback", "close", "reset", "invalidate"])
def test_a_swallowed_refusal_leaves_the_transaction_whole(engine: sa.Engine, method: str) -> None:
    """The refusal happens before anything is touched: a handler that swallows it changes nothing."""

    def handler(message: Any, session: Session) -> None:
        session.execute(sa.text("INSERT INTO t VALUES (2)"))
        with contextlib.suppress(ConfigurationError):
            getattr(session, method)()

    _transaction(engine, handler)
    assert _rows(engine) == [1, 2, 3]


@pytest.mark.parametrize("end", [
    lambda s: s.connection().commit(),
    lambda s: s.get_transaction().commit(),
    lambda s: s.connection().rollback(),
    lambda s: s.get_transaction().rollback(),
    lambda s: s.connection().close(),
], ids=["connection-commit", "transaction-commit", "connection-rollback", "transaction-rollback",
        "connection-close"])
def test_ending_the_transaction_behind_the_session_commits_nothing(
    engine: sa.Engine, end: Callable[[Session], Any]
) -> None:
    """Through the connection or the transaction object, swallowed or not: all or nothing, and it fails."""

    def handler(message: Any, session: Session) -> None:
        session.execute(sa.text("INSERT INTO t VALUES (2)"))
        with contextlib.suppress(Exception):
            end(session)

    with pytest.raises(Exception):  # noqa: B017 - which one depends on how the transaction was ended
        _transaction(engine, handler)
    assert _rows(engine) == []


def test_savepoints_stay_the_handlers_own(engine: sa.Engine) -> None:
    """begin_nested() in a handler still works: its rollback undoes the savepoint only."""

    def handler(message: Any, session: Session) -> None:
        with contextlib.suppress(RuntimeError), session.begin_nested():
            session.execute(sa.text("INSERT INTO t VALUES (2)"))
            raise RuntimeError("undo the savepoint")
        with session.begin_nested():
            session.execute(sa.text("INSERT INTO t VALUES (4)"))

    _transaction(engine, handler)
    assert _rows(engine) == [1, 3, 4]


def test_the_session_is_the_runners_again_after_the_handler(engine: sa.Engine) -> None:
    """Outside a handler the session commits and closes as usual; no flag is left on the pooled connection."""
    with _session.HandlerSession(engine) as session:
        session.execute(sa.text("INSERT INTO t VALUES (1)"))
        _session.call(lambda m, s: None, None, session, "g:t")
        info = session.connection().info
        session.commit()
    assert _rows(engine) == [1]
    assert _session._LENT not in info
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert _rows(engine) == [1, 2]


async def _coroutine_function(message: Any, session: Session) -> None:
    session.execute(sa.text("INSERT INTO t VALUES (2)"))


def test_an_awaitable_result_is_unrunnable(engine: sa.Engine) -> None:
    """A handler returning a coroutine: the runner's carrier error, the coroutine closed, nothing committed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(_session.Unrunnable) as info:
            _transaction(engine, lambda m, s: _coroutine_function(m, s))
        gc.collect()
    assert isinstance(info.value.error, ConfigurationError)
    assert "native async handlers are not supported yet" in str(info.value.error)
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert _rows(engine) == []


def test_a_future_result_is_unrunnable(engine: sa.Engine) -> None:
    """Any awaitable is refused, not only coroutines."""
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(_session.Unrunnable, match="awaitable"):
            _transaction(engine, lambda m, s: loop.create_future())
    finally:
        loop.close()
    assert _rows(engine) == []
