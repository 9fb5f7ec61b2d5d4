"""Async handlers on a real broker: other I/O awaited in the transaction, the group kept, sync ones alongside.

The guarantee tests (dedup, crash redelivery, dead letters, batching,
sequences, the handler session, the model) run with both kinds of handler
(the ``handler_kind`` fixture); these are what only an async handler has.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import exactlyonce
from exactlyonce import Message, migrate
from exactlyonce.storage import engine as _db
from tests.conftest import drop_all_tables

from .helpers import (
    CONSUMER_CONFIG,
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_rows,
    effects,
    engine_for,
    insert_effect,
    insert_effect_async,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    unique,
    wait_all_committed,
    wait_until,
)

pytestmark = pytest.mark.service

#: Longer than the group's session timeout (CONSUMER_CONFIG): a member that sent no
#: heartbeat for that long would be evicted, and its records redelivered.
SLOW_S = CONSUMER_CONFIG["session_timeout_ms"] / 1000 + 3


def _id(message: Message) -> str:
    return (message.header("message-id") or b"").decode()


async def _echo_over_tcp(payload: bytes) -> bytes:
    """Real socket I/O on the running loop: a TCP server and a client of it, both on this loop."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload + b"\n")
        await writer.drain()
        answer = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return answer.rstrip(b"\n")
    finally:
        server.close()
        await server.wait_closed()


def test_a_handler_awaiting_other_io_longer_than_the_session_timeout_keeps_its_partitions(
    bootstrap_servers: str, postgres_url: str
) -> None:
    """An async handler awaits socket I/O and a sleep longer than session_timeout_ms, inside its transaction.

    Heartbeats go on (kafka-python sends them from its own thread), so the
    member is not evicted: each record is handled once, nothing is redelivered
    (no duplicate), and the offsets commit right after. The handler's write
    after the awaits commits with its claim.
    """
    drop_all_tables(postgres_url)
    engine = engine_for(postgres_url)
    migrate.upgrade(engine)
    create_effects(engine)
    topic = unique("slow-async")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, postgres_url, outbox=False)
    calls: list[tuple[str, float]] = []

    @app.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        started = time.monotonic()
        echoed, _ = await asyncio.gather(_echo_over_tcp(message.value or b""), asyncio.sleep(SLOW_S))
        calls.append((_id(message), time.monotonic() - started))
        await session.execute(sa.insert(effects).values(message_id=_id(message), payload=echoed.decode(), worker=""))

    produce(bootstrap_servers, topic, [rec("slow-1", "one"), rec("slow-2", "two")])
    with running(app, join_timeout=SLOW_S + 20):
        wait_all_committed(bootstrap_servers, app.group_id, topic, timeout=4 * SLOW_S + 30)
    assert [message_id for message_id, _ in calls] == ["slow-1", "slow-2"], "each handled once, in order"
    assert all(took >= SLOW_S for _, took in calls)
    assert [(row.message_id, row.payload) for row in effect_rows(engine)] == [("slow-1", "one"), ("slow-2", "two")]
    assert app.stats["applied"] == 2 and app.stats["duplicate"] == 0, dict(app.stats)
    committed, end = committed_and_end_offsets(bootstrap_servers, app.group_id, topic)
    assert committed == end == {0: 2}
    engine.dispose()


def test_sync_and_async_handlers_in_one_app_with_the_outbox(bootstrap_servers: str, database_url: str) -> None:
    """One App, a def handler and an async def one: each on its engine, both effectively once; the async
    one publishes through the outbox (session.run_sync(exactlyonce.publish, ...)), in its transaction."""
    engine = engine_for(database_url)
    create_effects(engine)
    sync_topic, async_topic, out_topic = unique("mixed-sync"), unique("mixed-async"), unique("mixed-out")
    for topic in (sync_topic, async_topic, out_topic):
        create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url)

    @app.handler(sync_topic)
    def handle_sync(message: Message, session: Session) -> None:
        insert_effect(session, _id(message), "sync")

    @app.handler(async_topic)
    async def handle_async(message: Message, session: AsyncSession) -> None:
        await insert_effect_async(session, _id(message), "async")
        await session.run_sync(exactlyonce.publish, out_topic, b"done:" + (message.value or b""),
                               message_id=f"out-{_id(message)}")

    produce(bootstrap_servers, sync_topic, [rec("s-1"), rec("s-2"), rec("s-1")])
    produce(bootstrap_servers, async_topic, [rec("a-1"), rec("a-2"), rec("a-1")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, sync_topic, async_topic)
        published = wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(read_topic(bootstrap_servers,
                                                                                           out_topic, 5)),
                               30, "the async handler's outbox records relayed")
    assert sorted((row.message_id, row.payload) for row in effect_rows(engine)) == [
        ("a-1", "async"), ("a-2", "async"), ("s-1", "sync"), ("s-2", "sync")]
    assert sorted(r.value for r in published) == [b"done:v:a-1", b"done:v:a-2"]
    assert {r.message_id: r.outcome for r in dedup_rows(engine)} == dict.fromkeys(
        ["s-1", "s-2", "a-1", "a-2"], "applied")
    assert app.stats["applied"] == 4 and app.stats["duplicate"] == 2
    assert app.owns_async_engine
    engine.dispose()


def test_an_async_only_app_given_its_async_engine(bootstrap_servers: str, database_url: str) -> None:
    """App(async_engine=...) with async handlers only (outbox=False): the given engine is used, not disposed of."""
    engine = engine_for(database_url)
    create_effects(engine)
    topic = unique("given-async")
    create_topic(bootstrap_servers, topic)
    given = _db.create_async_engine(database_url)
    connects: list[Any] = []
    sa.event.listen(given.sync_engine, "connect", lambda *args: connects.append(args))
    app = exactlyonce.App(unique("group"), bootstrap_servers=bootstrap_servers, async_engine=given,
                          consumer_config=CONSUMER_CONFIG, outbox=False)

    @app.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        await insert_effect_async(session, _id(message))

    produce(bootstrap_servers, topic, [rec("g-1"), rec("g-1"), rec("g-2")])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert sorted(row.message_id for row in effect_rows(engine)) == ["g-1", "g-2"]
    assert connects, "the given engine made the connections"
    assert not app.owns_async_engine and app.async_engine is given
    # Not disposed of by the framework: its pool still holds the worker's connection(s).
    assert given.sync_engine.pool.checkedin() > 0
    given.sync_engine.pool.dispose()  # the test's own clean-up (those connections' loop has ended)
    engine.dispose()
