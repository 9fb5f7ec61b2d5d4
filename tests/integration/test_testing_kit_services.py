"""The test kit on the real databases, and its broker-side parts: Worker, fresh_database, the plugin's fixtures."""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
import exactlyonce.pytest_plugin as plugin
from exactlyonce import App, ConfigurationError, Message, Producer, ids
from exactlyonce.storage import engine as _db
from exactlyonce.storage import migrate
from exactlyonce.testing import TestApp, Worker, fresh_database
from tests.integration.helpers import create_topic, unique

pytest_plugins = ["pytester"]

metadata = sa.MetaData()
effects = sa.Table("kit_effects", metadata, sa.Column("topic", sa.String(64)), sa.Column("n", sa.Integer))


def test_the_kit_on_each_database(database_url: str) -> None:
    app = App("kit-databases")

    @app.handler("orders", message_id=ids.json_field("id"))
    def handle(message: Message, session: Session) -> None:
        order = message.json()
        if order.get("bad"):
            raise exactlyonce.DeadLetter("bad-order")
        session.execute(sa.insert(effects).values(topic="orders", n=order["n"]))
        exactlyonce.publish(session, "orders-done", {"n": order["n"]}, key=order["id"])

    @app.handler("batches", batch=True, message_id=ids.json_field("id"))
    def handle_batch(messages: list[Message], session: Session) -> None:
        session.execute(sa.insert(effects), [{"topic": "batches", "n": m.json()["n"]} for m in messages])

    @app.handler("streams", sequence=lambda m: ("s", m.json()["n"]))
    def handle_in_order(message: Message, session: Session) -> None:
        session.execute(sa.insert(effects).values(topic="streams", n=message.json()["n"]))

    with TestApp(app, database_url=database_url) as t:
        metadata.create_all(t.engine)
        try:
            assert t.send("orders", {"id": "a", "n": 1}) == "applied"
            assert t.send("orders", {"id": "a", "n": 1}) == "duplicate"
            assert t.send("orders", {"id": "b", "n": 2, "bad": True}) == "dead_lettered"
            assert t.dead_letters[-1].reason == "bad-order"
            for n in (1, 2, 1):
                t.produce("batches", {"id": f"x{n}", "n": n})
            assert t.process() == ["applied", "applied", "duplicate"]
            assert [t.send("streams", {"n": n}) for n in (2, 3, 1)] == ["parked", "parked", "applied"]
            with t.session() as session:
                rows = session.execute(sa.select(effects.c.topic, effects.c.n)).all()
            assert sorted(tuple(row) for row in rows) == [
                ("batches", 1), ("batches", 2), ("orders", 1), ("streams", 1), ("streams", 2), ("streams", 3)]
            assert [(p.topic, p.key, p.json()) for p in t.published] == [("orders-done", b"a", {"n": 1})]
        finally:
            metadata.drop_all(t.engine)


@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"])
def test_fresh_database_is_new_and_dropped_after(server: str, request: pytest.FixtureRequest) -> None:
    server_url: str = request.getfixturevalue(server)
    with fresh_database(server_url, prefix="kit_fresh") as url:
        name = _db.normalize_url(url).database
        assert name is not None and name.startswith("kit_fresh_")
        engine = _db.create_engine(url)
        try:
            assert sa.inspect(engine).get_table_names() == []
            metadata.create_all(engine)
        finally:
            engine.dispose()
    admin = _db.create_engine(server_url)
    try:
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                names = conn.execute(sa.text("SELECT datname FROM pg_database")).scalars().all()
            else:
                names = conn.execute(sa.text("SHOW DATABASES")).scalars().all()
        assert name not in names
    finally:
        admin.dispose()


def test_fresh_database_refuses_sqlite() -> None:
    with pytest.raises(ConfigurationError, match="PostgreSQL or MySQL"), fresh_database("sqlite:///x.db"):
        pass


def _app(bootstrap_servers: str, database_url: str, topic: str) -> App:
    app = App(unique("kit-worker"), bootstrap_servers=bootstrap_servers, database_url=database_url)

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        session.execute(sa.insert(effects).values(topic=topic, n=int(message.value or b"0")))

    return app


def _count(engine: sa.Engine, topic: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(effects).where(effects.c.topic == topic))
                   .scalar_one())


def test_a_worker_runs_the_app_in_a_thread_until_stopped(bootstrap_servers: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    topic = unique("kit-worker")
    create_topic(bootstrap_servers, topic)
    app = _app(bootstrap_servers, url, topic)
    migrate.upgrade(app.engine)
    metadata.create_all(app.engine)
    before = set(threading.enumerate())
    with Worker(app) as worker, Producer(bootstrap_servers) as producer:
        for n in range(3):
            producer.send(topic, str(n), message_id=f"m{n}")
        producer.send(topic, "0", message_id="m0")
        producer.flush()
        assert worker.wait_for(lambda: _count(app.engine, topic) == 3)
        assert worker.running
    assert not worker.running and worker.error is None
    assert set(threading.enumerate()) <= before  # the worker and its relay thread are gone
    assert _count(app.engine, topic) == 3
    app.engine.dispose()


def test_a_worker_raises_what_run_raised(bootstrap_servers: str, tmp_path: Path) -> None:
    topic = unique("kit-worker")
    app = _app(bootstrap_servers, f"sqlite:///{tmp_path}/empty.db", topic)  # no tables: run() refuses
    worker = Worker(app).start()
    with pytest.raises(AssertionError, match="the worker stopped"):
        worker.wait_for(lambda: False)
    assert isinstance(worker.error, ConfigurationError)
    with pytest.raises(ConfigurationError, match="db upgrade"):
        worker.stop()
    app.engine.dispose()


def test_the_worker_fixture_runs_and_stops_workers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, bootstrap_servers: str
) -> None:
    topic = unique("kit-fixture")
    create_topic(bootstrap_servers, topic)
    monkeypatch.setenv(plugin.BOOTSTRAP_SERVERS_ENV, bootstrap_servers)
    monkeypatch.delenv(plugin.DATABASE_URL_ENV, raising=False)
    monkeypatch.setattr(plugin, "_containers_usable", lambda: False)
    pytester.makepyfile(f"""
        import threading

        import sqlalchemy as sa
        import exactlyonce
        from exactlyonce.storage import migrate

        TOPIC = {topic!r}
        metadata = sa.MetaData()
        effects = sa.Table("effects", metadata, sa.Column("n", sa.Integer))
        before = set()

        def make_app(servers, url, group):
            app = exactlyonce.App(group, bootstrap_servers=servers, database_url=url)

            @app.handler(TOPIC)
            def handle(message, session):
                session.execute(sa.insert(effects).values(n=int(message.value)))

            return app

        def test_end_to_end(exactlyonce_bootstrap_servers, exactlyonce_database_url, exactlyonce_worker):
            before.update(threading.enumerate())
            app = make_app(exactlyonce_bootstrap_servers, exactlyonce_database_url, "fixture-ok")
            migrate.upgrade(app.engine)
            metadata.create_all(app.engine)
            worker = exactlyonce_worker(app)
            with exactlyonce.Producer(exactlyonce_bootstrap_servers) as producer:
                producer.send(TOPIC, "7", message_id="a")

            def applied():
                with app.engine.connect() as conn:
                    return conn.execute(sa.select(effects.c.n)).scalars().all()

            assert worker.wait_for(applied) == [7]

        def test_workers_were_stopped():
            assert not [t for t in threading.enumerate() if t not in before]

        def test_a_failed_run_fails_the_test(exactlyonce_bootstrap_servers, tmp_path, exactlyonce_worker):
            app = make_app(exactlyonce_bootstrap_servers, f"sqlite:///{{tmp_path}}/none.db", "fixture-bad")
            exactlyonce_worker(app)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_a_failed_run_fails_the_test*",
                                 "*ConfigurationError*db upgrade*"])


def test_the_bootstrap_servers_fixture_starts_an_embedded_broker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(plugin.BOOTSTRAP_SERVERS_ENV, raising=False)
    pytester.makepyfile("""
        import socket

        def test_broker(exactlyonce_bootstrap_servers):
            host, port = exactlyonce_bootstrap_servers.rsplit(":", 1)
            assert host == "127.0.0.1"
            socket.create_connection((host, int(port)), timeout=5).close()
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_with_docker_the_database_fixture_gives_each_test_a_fresh_postgresql_database(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    """The container path, with a stand-in for testcontainers' PostgresContainer that gives the local server."""
    started: list[Any] = []

    class PostgresContainer:
        def __init__(self, image: str, *, driver: str | None) -> None:
            started.append((image, driver))

        def __enter__(self) -> PostgresContainer:
            return self

        def __exit__(self, *exc: object) -> None:
            started.append("stopped")

        def get_connection_url(self) -> str:
            return postgres_url

    monkeypatch.delenv(plugin.DATABASE_URL_ENV, raising=False)
    monkeypatch.setattr(plugin, "_containers_usable", lambda: True)
    monkeypatch.setattr(plugin, "_testcontainers_module",
                        lambda name: types.SimpleNamespace(PostgresContainer=PostgresContainer))
    pytester.makepyfile("""
        import sqlalchemy as sa
        from exactlyonce.storage import engine as _db

        names = []

        def check(url):
            parsed = _db.normalize_url(url)
            assert parsed.get_backend_name() == "postgresql"
            names.append(parsed.database)
            with open("names.txt", "a") as out:
                print(parsed.database, file=out)
            engine = _db.create_engine(url)
            try:
                assert sa.inspect(engine).get_table_names() == []
                sa.Table("mine", sa.MetaData(), sa.Column("x", sa.Integer)).create(engine)
            finally:
                engine.dispose()

        def test_one(exactlyonce_database_url):
            check(exactlyonce_database_url)

        def test_two(exactlyonce_database_url):
            check(exactlyonce_database_url)
            assert names[0] != names[1]
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    assert started == [("postgres:16-alpine", None), "stopped"]  # one container for the session
    created = (pytester.path / "names.txt").read_text().split()
    assert len(created) == 2
    admin = _db.create_engine(postgres_url)
    try:
        with admin.connect() as conn:
            existing = set(conn.execute(sa.text("SELECT datname FROM pg_database")).scalars())
        assert not existing & set(created)  # dropped after each test
    finally:
        admin.dispose()
