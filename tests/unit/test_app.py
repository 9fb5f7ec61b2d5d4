"""App: registration rules and configuration sources."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest

from exactlyonce import App, ConfigurationError, OnGap, ids
from exactlyonce.app import BOOTSTRAP_SERVERS_ENV, DATABASE_URL_ENV
from exactlyonce.storage import engine as _db


def noop(message: Any, session: Any) -> None:
    pass


def test_decorator_returns_the_function_unchanged() -> None:
    """@app.handler returns the user's function itself."""
    app = App(group_id="g")
    assert app.handler("t")(noop) is noop


def test_default_scope_message_id_and_dead_letter_topic() -> None:
    """Defaults: scope `<group>:<topic>`, message-id header, `<topic>.dlq`."""
    app = App(group_id="g")
    app.handler("t")(noop)
    handler = app.handlers["t"]
    assert handler.scope == "g:t"
    assert handler.dead_letter_topic == "t.dlq"
    assert handler.message_id.__qualname__ == ids.header().__qualname__


def test_name_overrides_the_scope() -> None:
    """name= pins the dedup scope."""
    app = App(group_id="g")
    app.handler("t", name="pinned")(noop)
    assert app.handlers["t"].scope == "pinned"


def test_duplicate_topic_or_scope_is_refused() -> None:
    """A second handler for a topic, or a reused scope, is a configuration error."""
    app = App(group_id="g")
    app.handler("t")(noop)
    with pytest.raises(ConfigurationError, match="already registered"):
        app.handler("t")
    with pytest.raises(ConfigurationError, match="already used"):
        app.handler("u", name="g:t")


@pytest.mark.parametrize("kwargs", [{"retry": "3"}, {"name": "x" * 201}, {"name": ""},
                                    {"dead_letter_topic": "no such topic!"}, {"max_value_bytes": 0},
                                    {"on_fingerprint_mismatch": "apply"},
                                    {"sequence": "stream"}, {"sequence": lambda m: ("s", 1), "batch": True},
                                    {"on_gap": "ignore"}, {"gap_timeout": timedelta(0)}])
def test_bad_handler_settings_are_refused(kwargs: dict[str, Any]) -> None:
    """Out-of-range handler settings are configuration errors."""
    with pytest.raises(ConfigurationError):
        App(group_id="g").handler("t", **kwargs)


def test_empty_group_id_is_refused() -> None:
    """group_id is required."""
    with pytest.raises(ConfigurationError):
        App(group_id="")


def test_settings_come_from_the_environment_when_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """bootstrap_servers and database_url fall back to EXACTLYONCE_* variables."""
    monkeypatch.setenv(BOOTSTRAP_SERVERS_ENV, "h:9092")
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite://")
    app = App(group_id="g")
    assert app.bootstrap_servers == "h:9092"
    assert app.database_url == "sqlite://"
    assert App(group_id="g", bootstrap_servers="x:1").bootstrap_servers == "x:1"


def test_missing_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without argument or variable, the error says which variable to set."""
    monkeypatch.delenv(BOOTSTRAP_SERVERS_ENV, raising=False)
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=BOOTSTRAP_SERVERS_ENV):
        _ = App(group_id="g").bootstrap_servers
    with pytest.raises(ConfigurationError, match=DATABASE_URL_ENV):
        _ = App(group_id="g").database_url


def test_run_without_handlers_is_refused() -> None:
    """run() needs at least one handler."""
    with pytest.raises(ConfigurationError, match="no handlers"):
        App(group_id="g").run()


@pytest.mark.parametrize("config", [{"enable_auto_commit": True}, {"group_id": "x"},
                                    {"bootstrap_servers": "x"}])
def test_consumer_config_cannot_break_the_guarantee(config: dict[str, Any]) -> None:
    """consumer_config may not turn on auto-commit or override group/broker."""
    from exactlyonce._kafka import Consumer

    with pytest.raises(ConfigurationError):
        Consumer(bootstrap_servers="127.0.0.1:1", group_id="g", topics=["t"], config=config,
                 on_revoked=lambda revoked, lost: None)


@pytest.mark.parametrize("topic", ["", "a b", "x" * 250, "t/1", ".", ".."])
def test_illegal_topic_names_are_refused(topic: str) -> None:
    """Topic names Kafka would reject are configuration errors at registration."""
    with pytest.raises(ConfigurationError, match="illegal topic"):
        App(group_id="g").handler(topic)


@pytest.mark.parametrize("dead_letter_topic", [".", ".."])
def test_illegal_dead_letter_topic_names_are_refused(dead_letter_topic: str) -> None:
    """A dead-letter topic Kafka would reject fails at registration, not at the first dead letter."""
    with pytest.raises(ConfigurationError, match="illegal topic"):
        App(group_id="g").handler("t", dead_letter_topic=dead_letter_topic)


def test_with_signing_keys_an_id_from_an_unsigned_header_is_refused() -> None:
    """The signature covers the message-id header, key and value: ids.header(other) could be forged."""
    app = App(group_id="g", signing_keys={"k1": b"0123456789abcdef"})
    with pytest.raises(ConfigurationError, match=r"ids.header\('x-id'\) reads a header the signature does not"):
        app.handler("t", message_id=ids.header("x-id"))
    app.handler("a", message_id=ids.header("message-id"))(noop)
    app.handler("b", message_id=ids.key())(noop)
    app.handler("c", message_id=ids.json_field("id"))(noop)
    # Without verification any header will do.
    App(group_id="g").handler("t", message_id=ids.header("x-id"))(noop)


def test_a_sequenced_handler_needs_no_message_id() -> None:
    """Sequenced handlers dedup by number; the message ID is optional (used in dead letters)."""
    app = App(group_id="g")
    app.handler("t", sequence=lambda m: ("s", 1), gap_timeout=timedelta(seconds=5), on_gap="dead_letter")(noop)
    handler = app.handlers["t"]
    assert handler.message_id is None
    assert handler.on_gap is OnGap.DEAD_LETTER
    assert handler.gap_timeout == timedelta(seconds=5)


async def async_handler(message: Any, session: Any) -> None:
    pass


async def async_generator_handler(message: Any, session: Any) -> Any:
    yield message


def generator_handler(message: Any, session: Any) -> Any:
    yield message


class AsyncCallable:
    async def __call__(self, message: Any, session: Any) -> None:
        pass

    async def method(self, message: Any, session: Any) -> None:
        pass


class SyncCallable:
    def __call__(self, message: Any, session: Any) -> None:
        pass


@pytest.mark.parametrize("func", [
    async_handler,
    functools.partial(async_handler),
    functools.partial(functools.partial(async_handler, "m")),
    AsyncCallable(),
    AsyncCallable().method,
    functools.partial(AsyncCallable(), "m"),
], ids=["async-def", "partial", "partial-of-partial", "async-call", "async-method", "partial-of-async-call"])
def test_async_handlers_register_as_async(func: Any) -> None:
    """A handler whose call returns a coroutine registers as an async handler (awaited with an AsyncSession)."""
    app = App(group_id="g")
    assert app.handler("t")(func) is func
    assert app.handlers["t"].is_async


def test_async_batch_and_sequenced_handlers_register_as_async() -> None:
    """batch=True and sequence= take async def handlers as well."""
    app = App(group_id="g")
    app.handler("t", batch=True)(async_handler)
    app.handler("u", sequence=lambda m: ("s", 1))(async_handler)
    assert app.handlers["t"].is_async and app.handlers["t"].batch
    assert app.handlers["u"].is_async and app.handlers["u"].sequence is not None


def test_async_generator_handlers_are_refused() -> None:
    """Calling an async generator function runs none of its body: refused at registration."""
    app = App(group_id="g")
    with pytest.raises(ConfigurationError, match="async generator function") as info:
        app.handler("t")(async_generator_handler)
    assert "async def handler(message, session)" in str(info.value)
    assert app.handlers == {}


def test_generator_function_handlers_are_refused() -> None:
    """Calling a generator function runs none of its body either."""
    with pytest.raises(ConfigurationError, match="generator function"):
        App(group_id="g").handler("t")(generator_handler)


@pytest.mark.parametrize("func", [noop, functools.partial(noop), SyncCallable(),
                                  functools.wraps(async_handler)(lambda message, session: None)],
                         ids=["function", "partial", "sync-call", "sync-wrapper-of-async"])
def test_sync_handlers_are_accepted(func: Any) -> None:
    """Plain functions, partials, callable objects and sync wrappers register as sync handlers.

    (A sync wrapper of an async def may run the coroutine itself; if it returns
    it instead, the runner stops with a ConfigurationError: tests/unit/test_session.py.)
    """
    app = App(group_id="g")
    assert app.handler("t")(func) is func
    assert not app.handlers["t"].is_async


def test_database_timeouts_default_from_the_poll_interval_and_stay_below_it() -> None:
    """lock_timeout defaults to a tenth of max_poll_interval_ms, the idle timeout to all of it."""
    app = App("g")
    assert (app.lock_timeout, app.idle_in_transaction_timeout) == (timedelta(seconds=30), timedelta(seconds=300))
    app = App("g", consumer_config={"max_poll_interval_ms": 60_000})
    assert (app.lock_timeout, app.idle_in_transaction_timeout) == (timedelta(seconds=6), timedelta(seconds=60))
    app = App("g", lock_timeout=timedelta(seconds=2), idle_in_transaction_timeout=timedelta(minutes=10))
    assert (app.lock_timeout, app.idle_in_transaction_timeout) == (timedelta(seconds=2), timedelta(minutes=10))
    with pytest.raises(ConfigurationError, match=r"lock_timeout \(10s\) must be below max_poll_interval_ms \(10s\)"):
        App("g", consumer_config={"max_poll_interval_ms": 10_000}, lock_timeout=timedelta(seconds=10))
    with pytest.raises(ConfigurationError, match="positive"):
        App("g", idle_in_transaction_timeout=timedelta(0))


def test_batch_lock_timeout_defaults_below_the_deadlock_check_and_is_refused_where_it_does_nothing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 ms (or lock_timeout if shorter); given, it must be positive, at most lock_timeout, and on PostgreSQL."""
    assert App("g").batch_lock_timeout == timedelta(milliseconds=200)
    assert App("g", lock_timeout=timedelta(milliseconds=50)).batch_lock_timeout == timedelta(milliseconds=50)
    # The default is not refused on other databases: it does nothing there.
    assert App("g", database_url="sqlite://").batch_lock_timeout == timedelta(milliseconds=200)
    postgres = "postgresql://u:p@127.0.0.1:1/db"
    app = App("g", database_url=postgres, batch_lock_timeout=timedelta(seconds=1))
    assert app.batch_lock_timeout == timedelta(seconds=1)
    with pytest.raises(ConfigurationError, match="positive"):
        App("g", batch_lock_timeout=timedelta(0))
    with pytest.raises(ConfigurationError, match=r"batch_lock_timeout \(5s\) must not exceed lock_timeout \(2s\)"):
        App("g", lock_timeout=timedelta(seconds=2), batch_lock_timeout=timedelta(seconds=5))
    for url in (f"sqlite:///{tmp_path}/x.db", "mysql://u:p@127.0.0.1:1/db", "mariadb+pymysql://u:p@127.0.0.1:1/db"):
        with pytest.raises(ConfigurationError, match="batch_lock_timeout applies to PostgreSQL only"):
            App("g", database_url=url, batch_lock_timeout=timedelta(milliseconds=100))
    # A URL from the environment is checked when the engine is made.
    monkeypatch.setenv(DATABASE_URL_ENV, f"sqlite:///{tmp_path}/y.db")
    app = App("g", batch_lock_timeout=timedelta(milliseconds=100))
    with pytest.raises(ConfigurationError, match="not sqlite"):
        app.engine  # noqa: B018
    with pytest.raises(ConfigurationError, match="not sqlite"):
        app.async_engine  # noqa: B018
    engine = _db.create_engine(f"sqlite:///{tmp_path}/z.db")
    with pytest.raises(ConfigurationError, match="not sqlite"):
        App("g", engine=engine, batch_lock_timeout=timedelta(seconds=1))
    engine.dispose()


def test_sqlite_busy_timeout_is_the_lock_timeout(tmp_path: Any) -> None:
    """On SQLite the lock timeout is the busy timeout."""
    app = App("g", database_url=f"sqlite:///{tmp_path}/x.db", lock_timeout=timedelta(seconds=3))
    with app.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 3000
    app.engine.dispose()


def test_async_engine_is_made_from_the_database_url_with_the_apps_timeouts(tmp_path: Any) -> None:
    """App.async_engine: the URL's async driver, the App's lock timeout; the App owns (and will dispose of) it."""
    import asyncio

    app = App("g", database_url=f"sqlite:///{tmp_path / 'a.db'}", lock_timeout=timedelta(seconds=3))
    engine = app.async_engine
    assert engine is app.async_engine and app.owns_async_engine
    assert engine.url.drivername == "sqlite+aiosqlite"

    async def busy_timeout() -> int:
        try:
            async with engine.connect() as conn:
                return int((await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(busy_timeout()) == 3000
    assert app.engine.url.drivername == "sqlite"  # the sync engine (sync handlers, outbox relay) from the same URL
    app.engine.dispose()


def test_a_given_async_engine_is_used_and_not_owned(tmp_path: Any) -> None:
    """App(async_engine=...): used as given, never disposed of; no sync engine is guessed from elsewhere."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    given = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    app = App("g", async_engine=given)
    assert app.async_engine is given and not app.owns_async_engine
    with pytest.raises(ConfigurationError, match="given async_engine= and no sync engine"):
        app.engine  # noqa: B018
    asyncio.run(given.dispose())


def test_async_engine_refuses_a_database_url_too_and_what_is_not_an_async_engine(tmp_path: Any) -> None:
    """database_url and async_engine together are ambiguous; a sync Engine or a URL is not an async engine."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    given = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ConfigurationError, match="not both"):
        App("g", database_url="sqlite://", async_engine=given)
    for wrong in (sa.create_engine("sqlite://"), "sqlite+aiosqlite://"):
        with pytest.raises(ConfigurationError, match=r"must be a sqlalchemy\.ext\.asyncio\.AsyncEngine"):
            App("g", async_engine=wrong)  # type: ignore[arg-type]
