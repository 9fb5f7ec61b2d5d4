"""The worker's event loop for async handlers: made by run(), closed after it, and what it leaves behind.

Real Runners over the in-memory Kafka twins and SQLite (aiosqlite for the async handlers).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from exactlyonce import App, ConfigurationError, Message, _db, migrate
from exactlyonce.testing import Cluster

TOPIC = "orders"


def _cluster(*ids: str) -> Cluster:
    cluster = Cluster()
    cluster.create_topic(TOPIC)
    cluster.create_topic(f"{TOPIC}.dlq")
    for message_id in ids:
        cluster.append(TOPIC, 0, key=None, value=json.dumps({"id": message_id}).encode(),
                       headers=[("message-id", message_id.encode())])
    return cluster


def _app(tmp_path: Path) -> App:
    app = App("g", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path / 'a.db'}", outbox=False)
    migrate.upgrade(app.engine)
    with app.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE effects (message_id TEXT)")
    return app


def _effects(app: App) -> list[str]:
    with app.engine.connect() as conn:
        return [row[0] for row in conn.exec_driver_sql("SELECT message_id FROM effects ORDER BY rowid")]


def test_the_loop_is_closed_and_the_tasks_a_handler_left_are_cancelled(tmp_path: Path) -> None:
    """A task an async handler started and left running is cancelled when run() returns; the loop is closed."""
    app = _app(tmp_path)
    left: list[asyncio.Task[None]] = []

    @app.handler(TOPIC)
    async def handle(message: Message, session: AsyncSession) -> None:
        left.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
        await session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": message.json()["id"]})

    _cluster("a", "b").run_until_read(app)
    assert _effects(app) == ["a", "b"]
    assert len(left) == 2 and all(task.cancelled() for task in left)
    assert left[0].get_loop().is_closed()
    app.engine.dispose()


def test_the_apps_own_async_engine_is_disposed_of_with_its_loop_and_serves_the_next_run(tmp_path: Path) -> None:
    """The async engine made from database_url: no pooled connection outlives run()'s loop; a new run works."""
    app = _app(tmp_path)

    @app.handler(TOPIC)
    async def handle(message: Message, session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": message.json()["id"]})

    cluster = _cluster("a", "a", "b")
    cluster.run_until_read(app)
    assert app.owns_async_engine
    assert app.async_engine.sync_engine.pool.checkedin() == 0
    cluster.append(TOPIC, 0, key=None, value=b'{"id": "c"}', headers=[("message-id", b"c")])
    cluster.run_until_read(app)
    assert _effects(app) == ["a", "b", "c"]
    assert (app.stats["applied"], app.stats["duplicate"]) == (3, 1)
    app.engine.dispose()


def test_a_worker_with_async_handlers_is_refused_on_a_running_loop(tmp_path: Path) -> None:
    """run() from a coroutine cannot make the worker's loop: a ConfigurationError saying what to do instead."""
    app = _app(tmp_path)

    @app.handler(TOPIC)
    async def handle(message: Message, session: AsyncSession) -> None:
        pass

    async def main() -> None:
        _cluster("a").run_until_read(app)

    with pytest.raises(ConfigurationError, match=r"asyncio\.to_thread"):
        asyncio.run(main())
    app.engine.dispose()


def test_sync_handlers_run_with_no_event_loop_and_beside_async_ones_on_the_workers(tmp_path: Path) -> None:
    """A sync-only app runs as before, with no loop; in a mixed app the sync handler runs on the worker's thread."""
    app = _app(tmp_path)
    loops: dict[str, Any] = {}

    def running_loop() -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    @app.handler(TOPIC)
    def handle(message: Message, session: Any) -> None:
        loops.setdefault("sync-only", running_loop())
        session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": message.json()["id"]})

    _cluster("a").run_until_read(app)
    assert loops == {"sync-only": None}

    (tmp_path / "mixed").mkdir()
    mixed = _app(tmp_path / "mixed")
    cluster = _cluster("s")
    cluster.create_topic("other")
    cluster.append("other", 0, key=None, value=b'{"id": "x"}', headers=[("message-id", b"x")])

    @mixed.handler(TOPIC)
    def handle_sync(message: Message, session: Any) -> None:
        loops["mixed-sync"] = running_loop()
        session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": message.json()["id"]})

    @mixed.handler("other")
    async def handle_async(message: Message, session: AsyncSession) -> None:
        loops["mixed-async"] = running_loop()
        await session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": message.json()["id"]})

    cluster.run_until_read(mixed)
    assert sorted(_effects(mixed)) == ["s", "x"]
    assert loops["mixed-async"] is not None and loops["mixed-sync"] is loops["mixed-async"]
    app.engine.dispose()
    mixed.engine.dispose()


def test_an_app_given_only_an_async_engine_has_none_for_a_sync_handler(tmp_path: Path) -> None:
    """App(async_engine=...) with a sync handler: the worker refuses to start, naming what is missing."""
    given = _db.create_async_engine(f"sqlite:///{tmp_path / 'a.db'}")
    app = App("g", bootstrap_servers="twin:9092", async_engine=given, outbox=False)

    @app.handler(TOPIC)
    def handle(message: Message, session: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match="sync handlers and its outbox relay"):
        _cluster("a").run_until_read(app)
