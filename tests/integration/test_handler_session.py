"""The session a handler is given cannot end the runner's transaction (a Session, or an async handler's AsyncSession).

A handler that commits, rolls back or closes its session would split the
record's transaction: in a batch, its commit would also commit the dedup rows
of records whose handlers have not run yet, and those records would then be
skipped as duplicates without ever being applied. The session refuses, the
handler fails, and its failure follows the ordinary path: the transaction
rolls back, the record is retried under its policy, then dead-lettered.

An ``async def`` handler's ``AsyncSession`` refuses the same calls, with the
same errors (``await session.commit()`` ...), and the same follows.

A *sync* handler that returns a coroutine did nothing: the runner stops with a
ConfigurationError instead of recording the record as applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, Message, Retry

from .helpers import (
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    engine_for,
    headers_of,
    insert_effect,
    insert_effect_async,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    unique,
    wait_all_committed,
)

pytestmark = pytest.mark.service


def _id(message: Message) -> str:
    return (message.header("message-id") or b"").decode()


def _sequence(message: Message) -> tuple[str, int]:
    return "s", int((message.value or b"0").decode())


def _letters(bootstrap: str, topic: str) -> dict[str, dict[str, str]]:
    letters = [headers_of(r) for r in read_topic(bootstrap, f"{topic}.dlq")]
    by_id = {h["message-id"]: h for h in letters}
    assert len(by_id) == len(letters), f"one dead letter per record: {[h['message-id'] for h in letters]}"
    return by_id


def test_commit_then_raise_keeps_no_effect(bootstrap_servers: str, database_url: str, handler_kind: str) -> None:
    """A handler that commits and then raises: nothing of it stays; it is retried, then dead-lettered once."""
    topic = unique("commits")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    produce(bootstrap_servers, topic, [rec("before"), rec("bad"), rec("after")])
    calls: list[str] = []
    app = make_app(bootstrap_servers, database_url, outbox=False)

    if handler_kind == "sync":
        @app.handler(topic, batch_size=1, retry=Retry(attempts=2))
        def handle(message: Message, session: Session) -> None:
            calls.append(_id(message))
            insert_effect(session, _id(message))
            if _id(message) == "bad":
                session.commit()
                raise RuntimeError("failed after committing")
    else:
        @app.handler(topic, batch_size=1, retry=Retry(attempts=2))
        async def handle_async(message: Message, session: AsyncSession) -> None:
            calls.append(_id(message))
            await insert_effect_async(session, _id(message))
            if _id(message) == "bad":
                await session.commit()
                raise RuntimeError("failed after committing")

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == {"before": 1, "after": 1}
    assert {r.message_id: r.outcome for r in dedup_rows(engine)} == {
        "before": "applied", "bad": "dead_lettered", "after": "applied"}
    assert calls.count("bad") == 2, "retried under the policy"
    letter = _letters(bootstrap_servers, topic)["bad"]
    assert letter["x-exactlyonce-reason"] == "handler-error"
    assert letter["x-exactlyonce-error-type"] == "ConfigurationError"
    assert "session.commit()" in letter["x-exactlyonce-error-message"]
    assert letter["x-exactlyonce-attempts"] == "2"
    engine.dispose()


@pytest.mark.parametrize("mode", ["record", "batch", "sequence"])
def test_handlers_that_commit_and_raise_lose_no_other_record(
    bootstrap_servers: str, database_url: str, mode: str, handler_kind: str
) -> None:
    """In one transaction of 25 records, 5 handlers commit and raise: every good record is applied exactly once."""
    topic = unique(f"commits-{mode}")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    bad = {f"m{n:02d}" for n in (2, 7, 12, 17, 22)}
    ids = [f"m{n:02d}" for n in range(25)]
    produce(bootstrap_servers, topic, [rec(i, str(n + 1)) for n, i in enumerate(ids)])
    app = make_app(bootstrap_servers, database_url, outbox=False)

    def one(message: Message, session: Session) -> None:
        insert_effect(session, _id(message))
        if _id(message) in bad:
            session.commit()
            raise RuntimeError("failed after committing")

    def handle_batch(messages: list[Message], session: Session) -> None:
        for message in messages:
            one(message, session)

    async def one_async(message: Message, session: AsyncSession) -> None:
        await insert_effect_async(session, _id(message))
        if _id(message) in bad:
            await session.commit()
            raise RuntimeError("failed after committing")

    async def handle_batch_async(messages: list[Message], session: AsyncSession) -> None:
        for message in messages:
            await one_async(message, session)

    record: Callable[..., Any] = one if handler_kind == "sync" else one_async
    batch: Callable[..., Any] = handle_batch if handler_kind == "sync" else handle_batch_async
    if mode == "batch":
        app.handler(topic, batch=True, batch_size=25, retry=Retry(attempts=1))(batch)
    elif mode == "sequence":
        app.handler(topic, sequence=_sequence, batch_size=25, retry=Retry(attempts=1))(record)
    else:
        app.handler(topic, batch_size=25, retry=Retry(attempts=1))(record)

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == {i: 1 for i in ids if i not in bad}
    assert set(_letters(bootstrap_servers, topic)) == bad
    if mode != "sequence":  # a sequenced handler keeps a watermark instead of a row per record
        assert {r.message_id: r.outcome for r in dedup_rows(engine)} == {
            i: "dead_lettered" if i in bad else "applied" for i in ids}
    assert app.stats["applied"] == 20 and app.stats["dead_lettered"] == 5
    engine.dispose()


def _misuses() -> dict[str, Callable[[Session], Any]]:
    return {
        "commit": lambda s: s.commit(),
        "rollback": lambda s: s.rollback(),
        "close": lambda s: s.close(),
        "reset": lambda s: s.reset(),
        "connection-commit": lambda s: s.connection().commit(),
        "connection-rollback": lambda s: s.connection().rollback(),
        "transaction-commit": lambda s: s.get_transaction().commit(),  # type: ignore[union-attr]
        "transaction-rollback": lambda s: s.get_transaction().rollback(),  # type: ignore[union-attr]
    }


async def _connection_commit(session: AsyncSession) -> None:
    await (await session.connection()).commit()


async def _connection_rollback(session: AsyncSession) -> None:
    await (await session.connection()).rollback()


async def _transaction_commit(session: AsyncSession) -> None:
    await session.get_transaction().commit()  # type: ignore[union-attr]


async def _transaction_rollback(session: AsyncSession) -> None:
    await session.get_transaction().rollback()  # type: ignore[union-attr]


def _async_misuses() -> dict[str, Callable[[AsyncSession], Any]]:
    """:func:`_misuses` through an async handler's AsyncSession (each returns what to await)."""
    return {
        "commit": lambda s: s.commit(),
        "rollback": lambda s: s.rollback(),
        "close": lambda s: s.close(),
        "reset": lambda s: s.reset(),
        "connection-commit": _connection_commit,
        "connection-rollback": _connection_rollback,
        "transaction-commit": _transaction_commit,
        "transaction-rollback": _transaction_rollback,
    }


def _misusing_handler(app: Any, topic: str, kind: str, swallow: bool, **settings: Any) -> None:
    """A handler of ``kind`` that writes its effect, then ends its session the way its message ID names."""
    if kind == "sync":
        misuses = _misuses()

        @app.handler(topic, **settings)
        def handle(message: Message, session: Session) -> None:
            insert_effect(session, _id(message))
            if _id(message) in misuses:
                with contextlib.suppress(Exception) if swallow else contextlib.nullcontext():
                    misuses[_id(message)](session)
    else:
        async_misuses = _async_misuses()

        @app.handler(topic, **settings)
        async def handle_async(message: Message, session: AsyncSession) -> None:
            await insert_effect_async(session, _id(message))
            if _id(message) in async_misuses:
                with contextlib.suppress(Exception) if swallow else contextlib.nullcontext():
                    await async_misuses[_id(message)](session)


def test_rollback_and_close_in_a_handler_are_refused(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """session.commit(), rollback() and close() raise in a handler; the record is dead-lettered, nothing kept."""
    topic = unique("refused")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    kinds = ["commit", "rollback", "close"]
    produce(bootstrap_servers, topic, [rec("first"), *(rec(k) for k in kinds), rec("last")])
    app = make_app(bootstrap_servers, database_url, outbox=False)
    _misusing_handler(app, topic, handler_kind, swallow=False, retry=Retry(attempts=1))

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == {"first": 1, "last": 1}
    letters = _letters(bootstrap_servers, topic)
    assert set(letters) == set(kinds)
    for kind in kinds:
        assert letters[kind]["x-exactlyonce-error-type"] == "ConfigurationError"
        assert f"session.{kind}()" in letters[kind]["x-exactlyonce-error-message"]
    assert {r.message_id: r.outcome for r in dedup_rows(engine)} == {
        "first": "applied", "last": "applied", **dict.fromkeys(kinds, "dead_lettered")}
    engine.dispose()


def test_a_handler_that_swallows_the_refusal_splits_nothing(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """Every way to end the transaction through the session, the error swallowed: all or nothing, per record.

    Each record either applied once (the transaction stayed whole) or was
    dead-lettered with no effect; the other records of the batch apply once.
    """
    topic = unique("swallowed")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    misuses = _misuses()
    good = [f"g{n}" for n in range(len(misuses) + 1)]
    produce(bootstrap_servers, topic, [rec(i) for pair in zip(good, [*misuses, None], strict=True)
                                       for i in pair if i is not None])
    app = make_app(bootstrap_servers, database_url, outbox=False)
    _misusing_handler(app, topic, handler_kind, swallow=True, batch_size=50, retry=Retry(attempts=1))

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    counts = effect_counts(engine)
    outcomes = {r.message_id: r.outcome for r in dedup_rows(engine)}
    letters = _letters(bootstrap_servers, topic)
    for good_id in good:
        assert counts.get(good_id) == 1 and outcomes[good_id] == "applied", good_id
    for kind in misuses:
        if outcomes[kind] == "applied":
            assert counts.get(kind) == 1 and kind not in letters, kind
        else:
            assert outcomes[kind] == "dead_lettered" and kind not in counts and kind in letters, kind
    # The refused calls leave the transaction whole; the others doom it.
    assert {k for k in misuses if outcomes[k] == "applied"} == {"commit", "rollback", "close", "reset"}
    engine.dispose()


async def _async_handler(message: Message, session: Session) -> None:
    insert_effect(session, _id(message))


@pytest.mark.parametrize("mode", ["record", "batch", "sequence"])
def test_a_handler_returning_a_coroutine_stops_the_worker(
    bootstrap_servers: str, database_url: str, mode: str
) -> None:
    """A sync function that returns a coroutine: run() raises ConfigurationError; nothing is recorded."""
    topic = unique(f"coro-{mode}")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    produce(bootstrap_servers, topic, [rec("a", "1"), rec("b", "2")])
    calls: list[Any] = []
    app = make_app(bootstrap_servers, database_url, outbox=False)

    def handle(message: Any, session: Session) -> Any:  # a wrapper that forgot to await
        calls.append(message)
        return _async_handler(message[0] if isinstance(message, list) else message, session)

    if mode == "batch":
        app.handler(topic, batch=True)(handle)
    elif mode == "sequence":
        app.handler(topic, sequence=_sequence)(handle)
    else:
        app.handler(topic)(handle)

    safety = threading.Timer(60, app.stop)  # before the fix run() would never return
    safety.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ConfigurationError, match="registered as a sync function"):
                app.run(install_signal_handlers=False)
            gc.collect()
    finally:
        safety.cancel()
        if app._engine is not None:
            app._engine.dispose()
    assert len(calls) == 1, "stopped at the first call"
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert effect_counts(engine) == {}
    assert dedup_rows(engine) == []
    committed, _ = committed_and_end_offsets(bootstrap_servers, app.group_id, topic)
    assert committed == {0: None}
    assert app.stats["applied"] == 0
    if mode == "sequence":
        from exactlyonce.schema import sequence_streams

        with engine.connect() as conn:
            assert conn.execute(sa.select(sequence_streams.c.watermark)).scalars().all() in ([], [0])
    engine.dispose()


def test_a_handler_returning_a_future_stops_the_worker(bootstrap_servers: str, database_url: str) -> None:
    """Any awaitable, not only a coroutine, is refused."""
    topic = unique("future")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    produce(bootstrap_servers, topic, [rec("a")])
    app = make_app(bootstrap_servers, database_url, outbox=False)
    loop = asyncio.new_event_loop()

    @app.handler(topic)
    def handle(message: Message, session: Session) -> Any:
        return loop.create_future()

    safety = threading.Timer(60, app.stop)
    safety.start()
    try:
        with pytest.raises(ConfigurationError, match="awaitable"):
            app.run(install_signal_handlers=False)
    finally:
        safety.cancel()
        loop.close()
        if app._engine is not None:
            app._engine.dispose()
    assert dedup_rows(engine) == []
    engine.dispose()
