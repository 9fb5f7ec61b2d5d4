"""The session lent to a handler: it cannot end the runner's transaction (SQLite, no services).

Each protection is tested for a sync handler (a ``Session``) and for an
``async def`` one (the ``AsyncSession`` that proxies it), the latter the way
the runner runs it: its transaction under ``greenlet_spawn`` on an event loop,
on an aiosqlite engine.
"""

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
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from exactlyonce import ConfigurationError, _db, _session


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = _db.create_engine(f"sqlite:///{tmp_path / 'session.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    yield engine
    engine.dispose()


@pytest.fixture
def async_engine(engine: sa.Engine) -> AsyncEngine:
    """An aiosqlite engine on the same file (each use disposes of it inside its own event loop)."""
    return _db.create_async_engine(engine.url)


def _rows(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [x for (x,) in conn.exec_driver_sql("SELECT x FROM t ORDER BY x")]


def _transaction(engine: sa.Engine, handler: Callable[[Any, Session], Any]) -> None:
    """What the runner does: a write, the handler, a write, one commit."""
    with _session.HandlerSession(engine) as session, session.begin():
        session.execute(sa.text("INSERT INTO t VALUES (1)"))
        _session.call(handler, None, session, "g:t")
        session.execute(sa.text("INSERT INTO t VALUES (3)"))


def _async_transaction(engine: AsyncEngine, handler: Callable[[Any, AsyncSession], Any]) -> None:
    """:func:`_transaction` for an async handler, as the runner runs it: on an event loop, under greenlet_spawn."""

    def transaction() -> None:
        with _session.HandlerSession.for_async(engine) as session, session.begin():
            session.execute(sa.text("INSERT INTO t VALUES (1)"))
            _session.call(handler, None, session, "g:t", is_async=True)
            session.execute(sa.text("INSERT INTO t VALUES (3)"))

    async def main() -> None:
        try:
            await greenlet_spawn(transaction)
        finally:
            await engine.dispose()

    asyncio.run(main())


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


# -- the same for async handlers -------------------------------------------------


def test_an_async_handler_writes_in_the_runners_transaction(engine: sa.Engine, async_engine: AsyncEngine) -> None:
    """An async def handler gets the AsyncSession of the transaction, may await other I/O, and commits with it."""
    seen: list[Any] = []

    async def handler(message: Any, session: AsyncSession) -> None:
        await asyncio.sleep(0.01)
        seen.append(type(session))
        # It sees the runner's uncommitted row: one transaction.
        seen.append((await session.execute(sa.text("SELECT COUNT(*) FROM t"))).scalar())
        await session.execute(sa.text("INSERT INTO t VALUES (2)"))

    _async_transaction(async_engine, handler)
    assert seen == [AsyncSession, 1]
    assert _rows(engine) == [1, 2, 3]


def test_an_async_handlers_failure_rolls_everything_back(engine: sa.Engine, async_engine: AsyncEngine) -> None:
    """What the coroutine raises is raised to the runner, and the transaction rolls back whole."""

    async def handler(message: Any, session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO t VALUES (2)"))
        await asyncio.sleep(0)
        raise LookupError("no such account")

    with pytest.raises(LookupError, match="no such account"):
        _async_transaction(async_engine, handler)
    assert _rows(engine) == []


@pytest.mark.parametrize("method", ["commit", "rollback", "close", "reset", "invalidate"])
def test_ending_the_async_session_is_refused_and_rolls_back(
    engine: sa.Engine, async_engine: AsyncEngine, method: str
) -> None:
    """await session.commit() and friends raise the same ConfigurationError; nothing is committed."""

    async def handler(message: Any, session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO t VALUES (2)"))
        await getattr(session, method)()

    with pytest.raises(ConfigurationError, match=rf"must not call session\.{method}\(\)"):
        _async_transaction(async_engine, handler)
    assert _rows(engine) == []


@pytest.mark.parametrize("method", ["commit", "rollback", "close", "reset", "invalidate"])
def test_a_swallowed_async_refusal_leaves_the_transaction_whole(
    engine: sa.Engine, async_engine: AsyncEngine, method: str
) -> None:
    """The async refusal too happens before anything is touched."""

    async def handler(message: Any, session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO t VALUES (2)"))
        with contextlib.suppress(ConfigurationError):
            await getattr(session, method)()

    _async_transaction(async_engine, handler)
    assert _rows(engine) == [1, 2, 3]


async def _connection_commit(session: AsyncSession) -> None:
    await (await session.connection()).commit()


async def _connection_rollback(session: AsyncSession) -> None:
    await (await session.connection()).rollback()


async def _connection_close(session: AsyncSession) -> None:
    await (await session.connection()).close()


async def _transaction_commit(session: AsyncSession) -> None:
    transaction = session.get_transaction()
    assert transaction is not None
    await transaction.commit()


async def _transaction_rollback(session: AsyncSession) -> None:
    transaction = session.get_transaction()
    assert transaction is not None
    await transaction.rollback()


@pytest.mark.parametrize("end", [_connection_commit, _transaction_commit, _connection_rollback,
                                 _transaction_rollback, _connection_close],
                         ids=["connection-commit", "transaction-commit", "connection-rollback",
                              "transaction-rollback", "connection-close"])
def test_ending_the_async_transaction_behind_the_session_commits_nothing(
    engine: sa.Engine, async_engine: AsyncEngine, end: Callable[[AsyncSession], Any]
) -> None:
    """Through the AsyncConnection or the AsyncSessionTransaction, swallowed or not: all or nothing, and it fails."""

    async def handler(message: Any, session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO t VALUES (2)"))
        with contextlib.suppress(Exception):
            await end(session)

    with pytest.raises(Exception):  # noqa: B017 - which one depends on how the transaction was ended
        _async_transaction(async_engine, handler)
    assert _rows(engine) == []


def test_async_savepoints_stay_the_handlers_own(engine: sa.Engine, async_engine: AsyncEngine) -> None:
    """async with session.begin_nested() works in an async handler: its rollback undoes the savepoint only."""

    async def handler(message: Any, session: AsyncSession) -> None:
        with contextlib.suppress(RuntimeError):
            async with session.begin_nested():
                await session.execute(sa.text("INSERT INTO t VALUES (2)"))
                raise RuntimeError("undo the savepoint")
        async with session.begin_nested():
            await session.execute(sa.text("INSERT INTO t VALUES (4)"))

    _async_transaction(async_engine, handler)
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


def test_an_awaitable_result_of_a_sync_handler_is_unrunnable(engine: sa.Engine) -> None:
    """A sync handler returning a coroutine: the runner's carrier error, the coroutine closed, nothing committed.

    (An async def handler is awaited; a sync function that returns a coroutine
    was registered as sync, so nothing of it ran: a bug to report, not to guess around.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(_session.Unrunnable) as info:
            _transaction(engine, lambda m, s: _coroutine_function(m, s))
        gc.collect()
    assert isinstance(info.value.error, ConfigurationError)
    assert "registered as a sync function" in str(info.value.error)
    assert "Register the async def function itself" in str(info.value.error)
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
