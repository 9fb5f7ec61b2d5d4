"""Selecting the worker's Kafka client (``App(kafka_client=...)``), and what the confluent consumer refuses."""

from __future__ import annotations

import argparse
import importlib.util
import threading
from datetime import timedelta
from typing import Any

import pytest

from exactlyonce import App, ConfigurationError, ExactlyOnceError, cli
from exactlyonce._kafka import Consumer, consumer_factory
from exactlyonce.runtime import Runner
from exactlyonce.settings import KAFKA_CLIENT_ENV
from tests.conftest import unavailable


@pytest.fixture
def confluent() -> Any:
    """The confluent consumer's module (skipped without confluent-kafka; failed under CI=true)."""
    if importlib.util.find_spec("confluent_kafka") is None:
        unavailable("confluent-kafka is not installed (pip install 'exactlyonce[confluent]')")
    from exactlyonce._kafka import confluent as module

    return module


@pytest.fixture(autouse=True)
def _no_client_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KAFKA_CLIENT_ENV, raising=False)


def test_kafka_python_is_the_default() -> None:
    assert App("g").kafka_client == "kafka-python"


def test_the_argument_else_the_environment(monkeypatch: pytest.MonkeyPatch, confluent: Any) -> None:
    monkeypatch.setenv(KAFKA_CLIENT_ENV, "confluent")
    assert App("g").kafka_client == "confluent"
    assert App("g", kafka_client="kafka-python").kafka_client == "kafka-python"


@pytest.mark.parametrize("name", ["confluent-kafka", "librdkafka", "Confluent", "aiokafka"])
def test_an_unknown_client_is_refused_at_construction(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown kafka_client .*'kafka-python', 'confluent'"):
        App("g", kafka_client=name)


def test_an_unknown_client_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KAFKA_CLIENT_ENV, "rdkafka")
    with pytest.raises(ConfigurationError, match="unknown kafka_client 'rdkafka'"):
        App("g")


def test_confluent_without_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "confluent_kafka" else real(name, *args))
    with pytest.raises(ConfigurationError, match=r"pip install 'exactlyonce\[confluent\]'"):
        App("g", kafka_client="confluent")


def test_the_runner_builds_the_consumer_of_the_apps_client(confluent: Any) -> None:
    assert consumer_factory("kafka-python") is Consumer
    assert consumer_factory("confluent") is confluent.ConfluentConsumer
    for client, expected in (("kafka-python", Consumer), ("confluent", confluent.ConfluentConsumer)):
        app = App("g", database_url="sqlite://", kafka_client=client)

        @app.handler("t")
        def handle(message: Any, session: Any) -> None:
            pass

        assert Runner(app, threading.Event())._consumer_factory is expected
        app.engine.dispose()


def test_lock_timeout_follows_librdkafkas_max_poll_interval(confluent: Any) -> None:
    app = App("g", kafka_client="confluent", consumer_config={"max.poll.interval.ms": 60_000})
    assert app.lock_timeout == timedelta(seconds=6)
    with pytest.raises(ConfigurationError, match="must be below max_poll_interval_ms"):
        App("g", kafka_client="confluent", consumer_config={"max.poll.interval.ms": 1000},
            lock_timeout=timedelta(seconds=2))


@pytest.mark.parametrize(("key", "advice"), [
    ("session_timeout_ms", "probably 'session.timeout.ms'"),
    ("security_protocol", "probably 'security.protocol'"),
    ("ssl_cafile", "use 'ssl.ca.location'"),
    ("sasl_plain_username", "use 'sasl.username'"),
    ("fetch_max_wait_ms", "use 'fetch.wait.max.ms'"),
    ("max_poll_records", "no equivalent"),
])
def test_kafka_python_settings_are_refused_with_librdkafkas_name(key: str, advice: str, confluent: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"{key}.*kafka-python setting.*{advice}"):
        confluent.check_config({key: 1})


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("group.id", "other", "set group_id on App"),
    ("bootstrap.servers", "h:9092", "set bootstrap_servers on App"),
    ("error_cb", print, "reports the client's errors itself"),
    ("on_commit", print, "reports failed commits itself"),
    ("enable.auto.commit", True, "breaks the guarantee"),
    ("enable.auto.commit", "true", "breaks the guarantee"),
])
def test_settings_exactlyonce_owns_are_refused(key: str, value: object, reason: str, confluent: Any) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        confluent.check_config({key: value})


def test_librdkafka_properties_and_the_bindings_callbacks_pass(confluent: Any) -> None:
    confluent.check_config({"session.timeout.ms": 6000, "security.protocol": "SSL", "enable.auto.commit": False,
                            "stats_cb": print, "statistics.interval.ms": 1000})


def test_the_consumer_refuses_bad_config_before_connecting(confluent: Any) -> None:
    for config, match in (({"session_timeout_ms": 6000}, "session.timeout.ms"),
                          ({"no.such.property": 1}, "invalid consumer_config for the confluent client")):
        with pytest.raises(ConfigurationError, match=match):
            confluent.ConfluentConsumer(bootstrap_servers="127.0.0.1:1", group_id="g", topics=["t"],
                                        config=config, on_revoked=lambda partitions, lost: None)


def _run_args(*options: str) -> argparse.Namespace:
    return cli._parser().parse_args(["run", "m:app", *options])


def test_run_selects_the_client(confluent: Any) -> None:
    app = App("g")
    cli._override_app_settings(app, _run_args("--kafka-client", "confluent"))
    assert app.kafka_client == "confluent"
    with pytest.raises(SystemExit):
        _run_args("--kafka-client", "rdkafka")


def test_run_refuses_kafka_python_settings_for_the_confluent_consumer(confluent: Any) -> None:
    with pytest.raises(ExactlyOnceError, match=r"--kafka-config takes kafka-python settings.*consumer_config"):
        cli._override_app_settings(App("g"), _run_args("--kafka-client", "confluent",
                                                      "--kafka-config", "security_protocol=SSL"))
