"""``App(engine=...)``: the application's own engine is used as it is, never disposed of, never altered.

``App.run()`` and ``exactlyonce run`` run here over the in-memory Kafka twins
(``exactlyonce.app.Runner`` replaced by one with the twins' factories) on a
SQLite engine; PostgreSQL's and MariaDB's per-transaction settings are in
tests/integration/test_own_engine.py.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import types
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

import exactlyonce.app
from exactlyonce import App, ConfigurationError, Message, _session, ids, migrate
from exactlyonce.cli import main
from exactlyonce.runtime import Runner
from exactlyonce.storage import engine as _db
from exactlyonce.testing import Cluster, TwinConsumer

TOPIC = "transfers"

effects = sa.Table("effects", sa.MetaData(), sa.Column("transfer_id", sa.String(50), primary_key=True))


class Watched:
    """A service's engine, with the instrumentation a service might have: statements seen, disposals counted."""

    def __init__(self, path: Path) -> None:
        self.engine = _db.create_engine(f"sqlite:///{path}", pool_size=2)
        self.statements: list[str] = []
        self.disposed = 0
        event.listen(self.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: self.statements.append(statement))
        event.listen(self.engine, "engine_disposed", self._on_dispose)
        migrate.upgrade(self.engine)
        effects.create(self.engine)
        self.pool = self.engine.pool

    def _on_dispose(self, engine: Any) -> None:
        self.disposed += 1

    def assert_untouched(self) -> None:
        assert self.disposed == 0 and self.engine.pool is self.pool
        assert not event.contains(self.engine, "commit", _session._refuse_commit)
        with self.engine.connect() as conn:  # still usable
            assert conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar_one() >= 0


@pytest.fixture
def watched(tmp_path: Path) -> Any:
    own = Watched(tmp_path / "service.db")
    yield own
    own.engine.dispose()


def _app(engine: sa.Engine, **kwargs: Any) -> App:
    app = App("g", bootstrap_servers="twin:9092", engine=engine, outbox=False, **kwargs)

    @app.handler(TOPIC, message_id=ids.json_field("transfer_id"))
    def handle(message: Message, session: Any) -> None:
        session.execute(sa.insert(effects).values(transfer_id=message.json()["transfer_id"]))

    return app


def _twin_runner(monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> None:
    """Make App.run() use the twins, and stop once everything is read."""

    def before_poll(member: TwinConsumer) -> bool:
        fake = member.fake
        if fake.generation is not None and all(
                fake.positions.get(tp, 0) >= cluster.end_offset(tp) for tp in fake.assigned):
            stops[-1].set()
            return True
        return False

    stops: list[threading.Event] = []
    cluster.before_poll = before_poll

    def runner(app: Any, stop: threading.Event) -> Runner:
        stops.append(stop)
        return Runner(app, stop, poll_timeout_s=0.01, consumer_factory=cluster.consumer_factory(),
                      producer_factory=cluster.producer_factory())

    monkeypatch.setattr(exactlyonce.app, "Runner", runner)


def _records(cluster: Cluster, *transfer_ids: str) -> None:
    for transfer_id in transfer_ids:
        cluster.append(TOPIC, 0, value=json.dumps({"transfer_id": transfer_id}).encode())


def test_app_run_uses_the_engine_and_does_not_dispose_of_it(
    watched: Watched, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster()
    _records(cluster, "t1", "t1", "t2")
    _twin_runner(monkeypatch, cluster)
    app = _app(watched.engine)
    app.run(install_signal_handlers=False)
    assert (app.stats["applied"], app.stats["duplicate"]) == (2, 1)
    with watched.engine.connect() as conn:
        assert conn.execute(sa.select(effects.c.transfer_id)).scalars().all() == ["t1", "t2"]
    # The framework's statements went through the service's engine and its instrumentation.
    assert any("INSERT INTO exactlyonce_processed" in s for s in watched.statements)
    assert app.engine.pool is watched.engine.pool
    watched.assert_untouched()
    # And again: a second run of the same App on the same engine.
    _records(cluster, "t3")
    app.run(install_signal_handlers=False)
    assert app.stats["applied"] == 3
    watched.assert_untouched()


def test_exactlyonce_run_does_not_dispose_of_the_engine(
    watched: Watched, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster()
    _records(cluster, "t1")
    _twin_runner(monkeypatch, cluster)
    module = types.ModuleType("exactlyonce_own_engine_app")
    module.app = _app(watched.engine)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert main(["run", f"{module.__name__}:app", "--log-level", "ERROR"]) == 0
    assert module.app.stats["applied"] == 1  # type: ignore[attr-defined]
    watched.assert_untouched()
    # --database-url cannot replace an engine the App was given.
    assert main(["run", f"{module.__name__}:app", "--database-url", "sqlite:///other.db"]) == 2
    watched.assert_untouched()


def test_engine_and_database_url_together_are_refused(watched: Watched) -> None:
    with pytest.raises(ConfigurationError, match="either database_url or engine, not both"):
        App("g", database_url="sqlite:///x.db", engine=watched.engine)


def test_the_database_url_of_an_app_given_an_engine_is_refused(
    watched: Watched, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", "sqlite:///from-env.db")  # the engine wins over the environment
    app = App("g", engine=watched.engine)
    assert app.engine.url == watched.engine.url
    with pytest.raises(ConfigurationError, match="was given its engine"):
        _ = app.database_url


def test_a_sqlite_engine_must_have_the_frameworks_settings(tmp_path: Path) -> None:
    plain = sa.create_engine(f"sqlite:///{tmp_path}/plain.db")
    with pytest.raises(ConfigurationError, match=r"storage.engine.create_engine.*BEGIN IMMEDIATE"):
        App("g", engine=plain)
    plain.dispose()
    tuned = _db.create_engine(f"sqlite:///{tmp_path}/tuned.db", lock_timeout=timedelta(seconds=4))
    App("g", engine=tuned)
    App("g", engine=tuned.execution_options(logging_token="svc"))  # a view of a tuned engine is tuned too
    with pytest.raises(ConfigurationError, match="lock_timeout has no effect on a SQLite engine"):
        App("g", engine=tuned, lock_timeout=timedelta(seconds=2))
    app = App("g", engine=tuned)
    with app.engine.connect() as conn:  # the busy timeout is the engine's
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 4000
    tuned.dispose()


def test_an_autocommit_engine_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    made = _db.create_engine(url, isolation_level="AUTOCOMMIT")
    tuned = _db.create_engine(url)
    for engine in (made, tuned.execution_options(isolation_level="AUTOCOMMIT")):
        with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            App("g", engine=engine)
    made.dispose()
    tuned.dispose()


@pytest.mark.parametrize("bad", ["sqlite:///x.db", object()], ids=["url", "object"])
def test_engine_must_be_an_engine(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"engine must be a sqlalchemy\.Engine"):
        App("g", engine=bad)


def test_the_handler_session_guard_stays_on_the_apps_view(watched: Watched) -> None:
    """The framework's listeners go on its view of the engine; the service's own transactions are as before."""
    app = App("g", engine=watched.engine)
    with _session.HandlerSession(app.engine) as session, session.begin():
        session.execute(sa.insert(effects).values(transfer_id="x"))
    assert event.contains(app.engine, "commit", _session._refuse_commit)
    assert not event.contains(watched.engine, "commit", _session._refuse_commit)
    with watched.engine.begin() as conn:  # the service commits as it always did
        conn.execute(sa.insert(effects).values(transfer_id="y"))
    with watched.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(effects.c.transfer_id)).scalars()) == ["x", "y"]


def test_adopt_engine_leaves_unknown_databases_alone() -> None:
    """Another dialect gets no settings, as create_engine gives it none (here: a mock engine of another name)."""
    engine = sa.create_engine("sqlite://")
    original = engine.dialect.name
    try:
        engine.dialect.name = "otherdb"
        view = _db.adopt_engine(engine, lock_timeout=timedelta(seconds=1),
                                idle_in_transaction_timeout=timedelta(seconds=1), lock_timeout_given=True)
        assert view.pool is engine.pool
        assert not functools.reduce(lambda found, name: found or bool(getattr(view.dispatch, name)),
                                    ("begin", "commit", "rollback"), False)
    finally:
        engine.dialect.name = original
        engine.dispose()
