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


class _Record:
    """A confluent-kafka message as consume() returns it (a record, or an error report)."""

    def __init__(self, offset: int, error: Any = None) -> None:
        self._offset, self._error = offset, error

    def error(self) -> Any:
        return self._error

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> list[tuple[str, bytes | None]]:
        return [("message-id", b"m"), ("empty", None)]

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


def _consumer_returning(confluent: Any, *batches: list[_Record]) -> Any:
    consumer = object.__new__(confluent.ConfluentConsumer)
    consumer._deferred = None
    pending = list(batches)

    class Inner:
        def consume(self, num_messages: int, timeout: float) -> list[_Record]:
            assert num_messages == confluent.RECORDS_PER_POLL
            return pending.pop(0)

    consumer._consumer = Inner()
    return consumer


def test_poll_builds_messages_and_ignores_partition_eof(confluent: Any) -> None:
    from confluent_kafka import KafkaError

    end = KafkaError(KafkaError._PARTITION_EOF)
    consumer = _consumer_returning(confluent, [_Record(5), _Record(6), _Record(7, end)])
    batch = consumer.poll(0.1)
    [(tp, messages)] = batch.items()
    assert (tp.topic, tp.partition) == ("t", 0)
    assert [m.offset for m in messages] == [5, 6]
    assert messages[0].headers == (("message-id", b"m"), ("empty", b""))
    assert messages[0].timestamp_ms == 1_700_000_000_000 and messages[0].key == b"k"


@pytest.mark.parametrize(("code", "raised"), [
    ("_TRANSPORT", "TransientError"),
    ("_ALL_BROKERS_DOWN", "TransientError"),
    ("TOPIC_AUTHORIZATION_FAILED", "ConfigurationError"),
    ("SASL_AUTHENTICATION_FAILED", "ConfigurationError"),
])
def test_an_error_with_records_is_raised_by_the_next_poll(code: str, raised: str, confluent: Any) -> None:
    """The records fetched with an error are returned first: the consumer's position is already past them."""
    from confluent_kafka import KafkaError

    error = KafkaError(getattr(KafkaError, code))
    consumer = _consumer_returning(confluent, [_Record(1), _Record(2, error)], [_Record(3, error)])
    assert [m.offset for m in next(iter(consumer.poll(0.1).values()))] == [1]
    with pytest.raises(ExactlyOnceError) as deferred:
        consumer.poll(0.1)
    assert type(deferred.value).__name__ == raised
    with pytest.raises(ExactlyOnceError) as alone:
        consumer.poll(0.1)
    assert type(alone.value).__name__ == raised
