"""Dead letters the broker refuses: too large for the dead-letter topic, a topic that refuses every record,
or one that does not exist.

These run on an Apache Kafka broker of the module's own, with an authorizer
(anything without an ACL is allowed; one topic denies everything), topics
with a small ``max.message.bytes``, and no automatic topic creation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    KafkaAdminClient,
    NewTopic,
    ResourcePattern,
    ResourceType,
)
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, Message, Retry, migrate

from .helpers import (
    committed_and_end_offsets,
    dedup_rows,
    engine_for,
    headers_of,
    make_app,
    produce,
    read_topic,
    rec,
    run_until_it_fails,
    running,
    unique,
    wait_all_committed,
    wait_until,
)

#: The size limit of the small topics (bytes of a record batch).
LIMIT = 16384
FORBIDDEN = "forbidden.dlq"


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[str]:
    """A one-node Apache Kafka with an authorizer: every topic is open except ``forbidden.dlq``."""
    from tests.conftest import unavailable
    from tests.services.brokers import selected_kind
    from tests.services.kafka import KafkaCluster, KafkaUnavailable

    if selected_kind() == "tansu":
        pytest.skip("needs Apache Kafka (topic size limits and ACLs)")
    cluster = KafkaCluster(1, extra_properties={
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "true",
        "auto.create.topics.enable": "false",
    })
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        unavailable(f"no Apache Kafka: {exc}")
    try:
        admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
        try:
            result = admin.create_acls([ACL(
                principal="User:*", host="*", operation=ACLOperation.ALL, permission_type=ACLPermissionType.DENY,
                resource_pattern=ResourcePattern(ResourceType.TOPIC, FORBIDDEN))])
            assert not result["failed"], result
        finally:
            admin.close()
        yield cluster.bootstrap_servers
    finally:
        cluster.close()


def _create_small_topics(bootstrap: str, *names: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1,
                                      topic_configs={"max.message.bytes": str(LIMIT)}) for name in names])
    finally:
        admin.close()


def _sqlite(tmp_path: Any) -> str:
    url = f"sqlite:///{tmp_path / 'dlq.db'}"
    engine = engine_for(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def test_a_record_too_large_to_dead_letter_whole_is_dead_lettered_as_a_bounded_copy(
    acl_broker: str, tmp_path: Any
) -> None:
    """A record just under the limit fails its handler: a bounded, marked dead letter arrives and the worker goes on."""
    url = _sqlite(tmp_path)
    topic = unique("big")
    _create_small_topics(acl_broker, topic, f"{topic}.dlq")
    # Just under the limit with its own headers; the dead-letter headers push the copy over it.
    big = b"{" + b"x" * (LIMIT - 300) + b"}"
    positions = produce(acl_broker, topic, [rec("big-1", big), rec("ok-1"), rec("ok-2")])
    app = make_app(acl_broker, url, outbox=False)
    handled: list[str] = []

    @app.handler(topic, retry=Retry(attempts=1), batch_size=1)
    def handle(message: Message, session: Session) -> None:
        if message.value == big:
            raise ValueError("cannot handle this one")
        handled.append((message.header("message-id") or b"").decode())

    with running(app):
        wait_all_committed(acl_broker, app.group_id, topic, timeout=60)
    assert handled == ["ok-1", "ok-2"], "the partition moved on past the record"
    (dead,) = read_topic(acl_broker, f"{topic}.dlq")
    headers = headers_of(dead)
    assert dead.value == big[:1024]
    assert headers["x-exactlyonce-value-truncated"] == str(len(big))
    assert headers["message-id"] == "big-1", "the original headers are kept"
    assert headers["x-exactlyonce-reason"] == "handler-error"
    assert headers["x-exactlyonce-error-type"] == "ValueError"
    assert (headers["x-exactlyonce-topic"], headers["x-exactlyonce-offset"]) == (topic, str(positions[0][1]))
    engine = engine_for(url)
    assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [
        ("big-1", "dead_lettered"), ("ok-1", "applied"), ("ok-2", "applied")]
    engine.dispose()
    assert app.stats["dead_lettered:handler-error"] == 1


@pytest.mark.parametrize("dead_letter_topic", [FORBIDDEN, "__consumer_offsets"])
def test_a_dead_letter_topic_that_refuses_every_record_stops_the_worker(
    acl_broker: str, tmp_path: Any, dead_letter_topic: str
) -> None:
    """Not authorized, or an internal topic: a ConfigurationError naming the topic ends run(), soon, offsets kept."""
    url = _sqlite(tmp_path)
    topic = unique("refused")
    _create_small_topics(acl_broker, topic)
    produce(acl_broker, topic, [rec("bad-1", "payload")])
    app = make_app(acl_broker, url, outbox=False, transient_retry_budget=timedelta(seconds=2))

    @app.handler(topic, retry=Retry(attempts=1), dead_letter_topic=dead_letter_topic)
    def handle(message: Message, session: Session) -> None:
        raise ValueError("no")

    started = time.monotonic()
    error = run_until_it_fails(app, 60)
    assert time.monotonic() - started < 60
    assert isinstance(error, ConfigurationError), error
    assert dead_letter_topic in str(error)
    engine = engine_for(url)
    assert dedup_rows(engine) == [], "nothing recorded: the record is handled again once the topic is fixed"
    engine.dispose()
    committed, _ = committed_and_end_offsets(acl_broker, app.group_id, topic)
    assert committed == {0: None}, "the offset did not move past the record"


def test_a_missing_dead_letter_topic_is_named_and_the_worker_goes_on_once_it_exists(
    acl_broker: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker creates no topics: a dead letter to a topic nobody created fails as transient, with a
    message that says to create it; once it exists the dead letter arrives, once, and the partition moves on."""
    url = _sqlite(tmp_path)
    topic = unique("nodlq")
    _create_small_topics(acl_broker, topic)
    produce(acl_broker, topic, [rec("bad-1", "payload"), rec("ok-1")])
    app = make_app(acl_broker, url, outbox=False, producer_config={"max_block_ms": 2000})
    caplog.set_level(logging.WARNING, logger="exactlyonce")
    handled: list[str] = []

    @app.handler(topic, retry=Retry(attempts=1), batch_size=1)
    def handle(message: Message, session: Session) -> None:
        if message.header("message-id") == b"bad-1":
            raise ValueError("no")
        handled.append("ok-1")

    hint = f"publish to '{topic}.dlq' failed: the topic does not exist and the broker did not create it"
    with running(app):
        wait_until(lambda: any(hint in r.getMessage() for r in caplog.records), 60, "the missing-topic message")
        assert handled == [], "the partition waits at the record it cannot dead-letter"
        _create_small_topics(acl_broker, f"{topic}.dlq")
        wait_all_committed(acl_broker, app.group_id, topic, timeout=120)
    assert handled == ["ok-1"]
    (dead,) = read_topic(acl_broker, f"{topic}.dlq")
    assert headers_of(dead)["message-id"] == "bad-1"
