"""What the TLS and SASL tests share: topics, reads, the App scenario and the commands over a secured connection.

``config`` is always the kafka-python client settings for the broker at
``address`` (``security_protocol``, ``ssl_cafile``, ``sasl_*``); every client
here, the test's own included, uses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session

from exactlyonce import App, ConfigurationError, DeadLetter, Message, Producer, migrate, publish
from exactlyonce.signing import verify

from .helpers import (
    CONSUMER_CONFIG,
    create_effects,
    effect_counts,
    engine_for,
    insert_effect,
    subprocess_env,
    unique,
    wait_until,
)

Config = Mapping[str, Any]


def create_topic(address: str, config: Config, name: str) -> None:
    """Create ``name`` (one partition) through a secured admin client."""
    admin = KafkaAdminClient(bootstrap_servers=address, **config)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()


def read(address: str, config: Config, topic: str, count: int) -> list[Any]:
    """The first ``count`` records of ``topic`` (partition 0), read over the secured connection."""
    consumer = KafkaConsumer(bootstrap_servers=address, enable_auto_commit=False, **config)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        records: list[Any] = []

        def more() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return len(records) >= count

        wait_until(more, 30, f"{count} records in {topic}")
        return records
    finally:
        consumer.close()


def committed(address: str, config: Config, group: str, topic: str) -> int | None:
    """``group``'s committed offset of ``topic`` partition 0, read without joining the group."""
    consumer = KafkaConsumer(bootstrap_servers=address, group_id=group, enable_auto_commit=False, **config)
    try:
        offset: int | None = consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        consumer.close(autocommit=False)


@dataclass(frozen=True)
class Scenario:
    """What :func:`effectively_once` ran, for the commands to look at afterwards."""

    group_id: str
    topic: str
    database_url: str


def effectively_once(address: str, config: Config, database_url: str,
                     signing_key: tuple[str, bytes], prefix: str, *,
                     consumer_config: Config | None = None, kafka_client: str = "kafka-python") -> Scenario:
    """Producer -> App (handler, duplicate, dead letter, outbox relay), every client with ``config``.

    A signed Producer sends t-1, t-2, t-1 again (a lost acknowledgement),
    poison and t-3; the App applies three, skips the duplicate, dead-letters
    poison, and its outbox relay publishes (and signs) one record per applied
    message. The database must hold nothing but this scenario's tables.
    ``kafka_client="confluent"``: the worker's consumer on confluent-kafka,
    with ``consumer_config`` (librdkafka's names) instead of ``config``.
    """
    engine = engine_for(database_url)
    migrate.upgrade(engine)
    create_effects(engine)
    topic, out = unique(f"{prefix}-in"), unique(f"{prefix}-out")
    for name in (topic, out, f"{topic}.dlq"):
        create_topic(address, config, name)

    with Producer(address, config=dict(config), signing_key=signing_key) as producer:
        # One record per request: the embedded broker's end offsets are only right that way.
        for message_id in ["t-1", "t-2", "t-1", "poison", "t-3"]:  # t-1 re-sent: a lost acknowledgement
            producer.send(topic, {"id": message_id}, message_id=message_id)
            producer.flush()

    app = App(unique(f"{prefix}-group"), bootstrap_servers=address, database_url=database_url,
              consumer_config=dict(consumer_config) if consumer_config is not None else {**CONSUMER_CONFIG, **config},
              producer_config=dict(config), kafka_client=kafka_client,
              signing_keys=dict([signing_key]), signing_key=signing_key)

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        message_id = message.json()["id"]
        if message_id == "poison":
            raise DeadLetter("poison")
        insert_effect(session, message_id)
        publish(session, out, {"done": message_id}, message_id=f"done-{message_id}")

    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run(install_signal_handlers=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: errors or committed(address, config, app.group_id, topic) == 5, 60,
                   "the App to commit all five records")
        relayed = read(address, config, out, 3)
        dead = read(address, config, f"{topic}.dlq", 1)
    finally:
        app.stop()
        thread.join(30)
        if app._engine is not None:
            app._engine.dispose()
    assert not errors and not thread.is_alive()
    assert effect_counts(engine) == {"t-1": 1, "t-2": 1, "t-3": 1}
    assert app.stats["applied"] == 3 and app.stats["duplicate"] == 1 and app.stats["dead_lettered"] == 1
    assert dict(dead[0].headers)["x-exactlyonce-reason"] == b"poison"
    assert sorted(dict(r.headers)["message-id"] for r in relayed) == [b"done-t-1", b"done-t-2", b"done-t-3"]
    for record in relayed:  # the relay signed them, over the secured connection
        verify(Message(topic=out, partition=0, offset=record.offset, key=record.key, value=record.value,
                       headers=tuple(record.headers)), dict([signing_key]))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exactlyonce_outbox WHERE sent_at IS NULL")).scalar() == 0
    engine.dispose()
    return Scenario(app.group_id, topic, database_url)


def kafka_config_options(config: Config) -> list[str]:
    """``config`` as the commands' repeatable ``--kafka-config KEY=VALUE`` options."""
    options: list[str] = []
    for key, value in config.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        options += ["--kafka-config", f"{key}={text}"]
    return options


def command(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m exactlyonce ARGV`` as an operator would."""
    return subprocess.run([sys.executable, "-m", "exactlyonce", *argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)


def relay_command(address: str, config: Config, database_url: str, prefix: str) -> None:
    """`exactlyonce relay --once --kafka-config ...` sends a published record with the same settings as the App."""
    engine = engine_for(database_url)
    migrate.upgrade(engine)
    out = unique(f"{prefix}-relay")
    create_topic(address, config, out)
    with Session(engine) as session, session.begin():
        publish(session, out, {"n": 1}, message_id=f"relayed-{prefix}")
    engine.dispose()
    result = command("relay", "--once", "--database-url", database_url, "--bootstrap-servers", address,
                     *kafka_config_options(config))
    assert result.returncode == 0, result.stderr
    (record,) = read(address, config, out, 1)
    assert dict(record.headers)["message-id"] == f"relayed-{prefix}".encode()


def status_command(address: str, config: Config, scenario: Scenario) -> dict[str, Any]:
    """`exactlyonce status --json --kafka-config ...` for ``scenario``'s database; its JSON."""
    result = command("status", "--json", "--database-url", scenario.database_url, "--bootstrap-servers", address,
                     *kafka_config_options(config))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def refused_at_start(address: str, database_url: str, match: str, **app_settings: Any) -> ConfigurationError:
    """An App with ``app_settings`` the broker refuses: ``run()`` raises a ConfigurationError matching ``match``."""
    app = App(unique("refused-group"), bootstrap_servers=address, database_url=database_url, outbox=False,
              **app_settings)

    @app.handler(unique("refused"))
    def handle(message: Message, session: Session) -> None:
        raise AssertionError("nothing can be consumed")

    migrate.upgrade(app.engine)
    try:
        with pytest.raises(ConfigurationError, match=match) as caught:
            app.run(install_signal_handlers=False)
    finally:
        app.engine.dispose()
    return caught.value
