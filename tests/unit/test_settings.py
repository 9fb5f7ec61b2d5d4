"""settings: the topic-name rule, "argument, else environment", and the clock, each written once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, ConfigurationError, Producer, publish, settings, signing
from exactlyonce.cli import main
from exactlyonce.outbox import Relay

SECRET = "0123456789abcdef"


@pytest.mark.parametrize("topic", ["t", "orders.v1", "a-b_c.D9", "x" * 249, "..."])
def test_legal_topic_names_pass(topic: str) -> None:
    """Kafka's alphabet, 1 to 249 characters; only '.' and '..' themselves are reserved."""
    assert settings.check_topic(topic) == topic


@pytest.mark.parametrize("topic", ["", "a b", "x" * 250, "t/1", "é", ".", "..", None, 7])
def test_illegal_topic_names_fail_with_the_rule(topic: Any) -> None:
    """The error names the value and states Kafka's rule."""
    with pytest.raises(ConfigurationError, match=r"illegal topic name .*but not '\.' or '\.\.'"):
        settings.check_topic(topic)


@pytest.mark.parametrize("topic", ["a b", "."])
def test_publish_and_registration_use_the_same_topic_rule(topic: str) -> None:
    """publish() refuses what App.handler refuses (publish once let '.' and '..' through to the broker)."""
    with pytest.raises(ConfigurationError, match="illegal topic name"):
        App(group_id="g").handler(topic)
    engine = sa.create_engine("sqlite://")
    with Session(engine) as session, pytest.raises(ConfigurationError, match="illegal topic name"):
        publish(session, topic, {"a": 1})


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argument, else the variable (read at call time), else None; empty counts as unset."""
    monkeypatch.setenv("EXACTLYONCE_TEST_SETTING", "from-env")
    assert settings.argument_or_environment("given", "EXACTLYONCE_TEST_SETTING") == "given"
    assert settings.argument_or_environment(None, "EXACTLYONCE_TEST_SETTING") == "from-env"
    assert settings.argument_or_environment("", "EXACTLYONCE_TEST_SETTING") == "from-env"
    monkeypatch.setenv("EXACTLYONCE_TEST_SETTING", "")
    assert settings.argument_or_environment(None, "EXACTLYONCE_TEST_SETTING") is None
    monkeypatch.delenv("EXACTLYONCE_TEST_SETTING")
    assert settings.argument_or_environment(None, "EXACTLYONCE_TEST_SETTING") is None


def test_connection_settings_name_the_option_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing servers or URL: the error says how this caller passes it, and which variable to set."""
    monkeypatch.delenv(settings.BOOTSTRAP_SERVERS_ENV, raising=False)
    monkeypatch.delenv(settings.DATABASE_URL_ENV, raising=False)
    expected = "no Kafka bootstrap servers: pass bootstrap_servers= or set EXACTLYONCE_BOOTSTRAP_SERVERS"
    with pytest.raises(ConfigurationError, match=expected):
        settings.bootstrap_servers(None)
    with pytest.raises(ConfigurationError, match="pass --bootstrap-servers or set EXACTLYONCE_BOOTSTRAP_SERVERS"):
        settings.bootstrap_servers("", option="--bootstrap-servers")
    with pytest.raises(ConfigurationError, match="no database: pass --database-url or set EXACTLYONCE_DATABASE_URL"):
        settings.database_url(None, option="--database-url")
    monkeypatch.setenv(settings.BOOTSTRAP_SERVERS_ENV, "env:9092")
    monkeypatch.setenv(settings.DATABASE_URL_ENV, "sqlite://")
    assert settings.bootstrap_servers(None) == "env:9092"
    assert settings.bootstrap_servers("arg:9092") == "arg:9092"
    assert settings.database_url(None) == "sqlite://"
    assert settings.database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_every_bootstrap_servers_reader_fails_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """App, Producer and Relay all resolve the servers through settings.bootstrap_servers."""
    monkeypatch.delenv(settings.BOOTSTRAP_SERVERS_ENV, raising=False)
    monkeypatch.delenv(settings.SIGNING_KEY_ENV, raising=False)
    expected = "no Kafka bootstrap servers: pass bootstrap_servers= or set EXACTLYONCE_BOOTSTRAP_SERVERS"
    with pytest.raises(ConfigurationError, match=expected):
        _ = App(group_id="g").bootstrap_servers
    with pytest.raises(ConfigurationError, match=expected):
        Producer()
    with pytest.raises(ConfigurationError, match=expected):
        Relay(sa.create_engine("sqlite://"))


def test_cli_relay_names_its_option(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`exactlyonce relay` without a broker names --bootstrap-servers, not the Python keyword."""
    monkeypatch.delenv(settings.BOOTSTRAP_SERVERS_ENV, raising=False)
    monkeypatch.setattr("exactlyonce.storage.migrate.require_tables", lambda *a, **kw: None)
    monkeypatch.setattr("exactlyonce.outbox.require_columns", lambda *a, **kw: None)
    assert main(["relay", "--once", "--database-url", "sqlite://"]) == 2
    assert "pass --bootstrap-servers or set EXACTLYONCE_BOOTSTRAP_SERVERS" in capsys.readouterr().err


def test_signing_key_argument_else_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argument (checked), else EXACTLYONCE_SIGNING_KEY, else None; App and Producer take it so."""
    monkeypatch.delenv(settings.SIGNING_KEY_ENV, raising=False)
    assert signing.resolve_signing_key(None) is None
    assert signing.resolve_signing_key(("k1", SECRET)) == ("k1", SECRET.encode())
    with pytest.raises(ConfigurationError):
        signing.resolve_signing_key(("k1", "short"))
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, f"k2:{SECRET}")
    assert signing.resolve_signing_key(None) == ("k2", SECRET.encode())
    assert signing.resolve_signing_key(("k1", SECRET)) == ("k1", SECRET.encode())
    assert App(group_id="g").signing_key == ("k2", SECRET.encode())
    assert App(group_id="g", signing_key=("k1", SECRET)).signing_key == ("k1", SECRET.encode())
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, "no-colon")
    for make in (lambda: App(group_id="g"), lambda: Producer("127.0.0.1:1"),
                 lambda: Relay(sa.create_engine("sqlite://"), "127.0.0.1:1")):
        with pytest.raises(ConfigurationError, match="EXACTLYONCE_SIGNING_KEY must have the form"):
            make()


def test_env_names_stay_importable_where_they_were() -> None:
    """app, signing, embedded and sequence still export the names they defined before settings existed."""
    from exactlyonce import app, embedded
    from exactlyonce import sequence as seq

    assert app.BOOTSTRAP_SERVERS_ENV == settings.BOOTSTRAP_SERVERS_ENV == "EXACTLYONCE_BOOTSTRAP_SERVERS"
    assert app.DATABASE_URL_ENV == settings.DATABASE_URL_ENV == "EXACTLYONCE_DATABASE_URL"
    assert signing.SIGNING_KEY_ENV == settings.SIGNING_KEY_ENV == "EXACTLYONCE_SIGNING_KEY"
    assert signing.SIGNING_KEYS_ENV == settings.SIGNING_KEYS_ENV == "EXACTLYONCE_SIGNING_KEYS"
    assert embedded.TANSU_BIN_ENV == settings.TANSU_BIN_ENV == "EXACTLYONCE_TANSU_BIN"
    assert seq.utcnow is settings.utcnow


def test_utcnow_is_naive_utc() -> None:
    """Naive, and the UTC wall clock (not local time), as the timestamp columns store it."""
    before = datetime.now(UTC).replace(tzinfo=None)
    now = settings.utcnow()
    after = datetime.now(UTC).replace(tzinfo=None)
    assert now.tzinfo is None
    assert before <= now <= after
    assert after - before < timedelta(seconds=5)
