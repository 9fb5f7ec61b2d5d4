"""Outbox rows the broker refuses, for good or for a while: key order, no re-sends, status, metrics, release.

The permanent refusal runs against the real broker (a topic whose
``max.message.bytes`` is too small for one row); the transient failures and
the refusals that are not about size go through an injected producer that
fails chosen records the way kafka-python's idempotent producer does: a
record that fails fails the later records of its partition in the same flush.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import kafka.errors
import pytest
import sqlalchemy as sa
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, TransientError, logs, migrate, publish
from exactlyonce import outbox as outbox_module
from exactlyonce.admin import status
from exactlyonce.cli import main
from exactlyonce.metrics import Metrics
from exactlyonce.outbox import Relay, RelayThread
from exactlyonce.schema import outbox

from .helpers import engine_for, read_topic, unique, wait_until


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() installs a log handler on the captured stderr; remove it before capsys closes that stream."""
    yield
    logs.reset()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``exactlyonce ARGV`` in this process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _publish(engine: sa.Engine, topic: str, rows: list[tuple[str, bytes, bytes]]) -> dict[str, int]:
    """Publish (message ID, key, value) rows in one transaction; return each message ID's row id."""
    with Session(engine) as session, session.begin():
        for message_id, key, value in rows:
            publish(session, topic, value, key=key, message_id=message_id)
    with engine.connect() as conn:
        return {m: i for m, i in conn.execute(sa.select(outbox.c.message_id, outbox.c.id))}


def _states(engine: sa.Engine) -> dict[str, str]:
    """Each row's state: sent, refused or pending."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.message_id, outbox.c.sent_at, outbox.c.refused_at)).all()
    return {r.message_id: "sent" if r.sent_at else "refused" if r.refused_at else "pending" for r in rows}


def _message_id(record: Any) -> str:
    return str(dict(record.headers)["message-id"].decode())


def _by_key(records: list[Any]) -> dict[bytes, list[str]]:
    ordered: dict[bytes, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        ordered.setdefault(record.key, []).append(_message_id(record))
    return ordered


# -- a real broker, a topic too small for one row ------------------------------------


def _create_topic(bootstrap: str, name: str, **configs: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1, topic_configs=configs)])
    finally:
        admin.close()
    wait_until(lambda: _has_partitions(bootstrap, name), 15, f"topic {name}")


def _has_partitions(bootstrap: str, name: str) -> bool:
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return bool(consumer.partitions_for_topic(name))
    finally:
        consumer.close()


def _alter_topic(bootstrap: str, name: str, **configs: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=configs)])
    finally:
        admin.close()


@pytest.mark.timeout(180)
def test_a_row_too_large_for_the_topic_is_refused_and_holds_back_only_its_key(
    bootstrap_servers: str, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """max.message.bytes refuses a2: a3 and a4 wait, other keys go once, a restart re-sends nothing, status and
    the gauge show it; after the topic is fixed, `outbox release` sends a2, a3, a4 in order."""
    topic = unique("ob-refused")
    _create_topic(bootstrap_servers, topic, **{"max.message.bytes": "2000"})
    engine = engine_for(database_url)
    small, large = b"s" * 50, b"L" * 5000
    ids = _publish(engine, topic, [("a1", b"a", small), ("b1", b"b", small), ("a2", b"a", large),
                                   ("c1", b"c", small), ("a3", b"a", small), ("b2", b"b", small),
                                   ("a4", b"a", small)])
    metrics = Metrics()
    relay = Relay(engine, bootstrap_servers, metrics=metrics)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), kwargs={"idle_wait": timedelta(milliseconds=50)})
    thread.start()
    try:
        wait_until(lambda: metrics.registry.get_sample_value("exactlyonce_outbox_refused") == 1, 60,
                   "the refused row in the gauge")
        assert metrics.registry.get_sample_value("exactlyonce_outbox_backlog") == 3
    finally:
        stop.set()
        thread.join(30)
        relay.close()
    assert (relay.published, relay.refused) == (4, 1)
    assert _states(engine) == {"a1": "sent", "b1": "sent", "a2": "refused", "c1": "sent", "a3": "pending",
                               "b2": "sent", "a4": "pending"}
    records = read_topic(bootstrap_servers, topic)
    assert sorted(_message_id(r) for r in records) == ["a1", "b1", "b2", "c1"], "each other row once"
    assert _by_key(records)[b"a"] == ["a1"]

    # A restart: nothing is sent again, the refused row stays refused, its key waits.
    restarted = Relay(engine, bootstrap_servers)
    try:
        assert restarted.run_once() == 0
    finally:
        restarted.close()
    assert len(read_topic(bootstrap_servers, topic)) == 4

    # status shows it, with the reason and the rows waiting behind it.
    result = status(engine, None)
    assert result.outbox is not None
    assert (result.outbox.pending, result.outbox.refused_count) == (3, 1)
    (row,) = result.outbox.refused
    assert (row.id, row.topic, row.key, row.message_id, row.waiting) == (ids["a2"], topic, b"a", "a2", 2)
    assert row.reason.startswith("MessageSizeTooLargeError: The server has a configurable maximum message size")
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", database_url)
    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    shown = json.loads(out)["outbox"]
    assert (shown["pending"], shown["refused"]) == (3, 1)
    assert [(r["id"], r["key"], r["message_id"], r["waiting"]) for r in shown["refused_rows"]] == [
        (ids["a2"], "a", "a2", 2)]
    code, out, err = cli(capsys, "status")
    assert code == 0, err
    assert "1 refused" in out and "a2" in out and "MessageSizeTooLarge" in out and "outbox release" in out

    # The operator raises the topic's limit and releases the row: a2, a3, a4 go, in order.
    _alter_topic(bootstrap_servers, topic, **{"max.message.bytes": "100000"})
    code, out, err = cli(capsys, "outbox", "release", str(ids["a2"]))
    assert code == 0, err
    assert "released 1 refused outbox row" in out
    relay = Relay(engine, bootstrap_servers)
    try:
        wait_until(lambda: relay.run_once() == 0 and _states(engine) == dict.fromkeys(ids, "sent"), 60,
                   "every row sent")
    finally:
        relay.close()
    records = read_topic(bootstrap_servers, topic)
    assert len(records) == len(ids)
    assert _by_key(records) == {b"a": ["a1", "a2", "a3", "a4"], b"b": ["b1", "b2"], b"c": ["c1"]}
    engine.dispose()


# -- an injected producer ----------------------------------------------------------------


class _Future:
    def __init__(self) -> None:
        self.is_done = False
        self.error: BaseException | None = None

    def succeeded(self) -> bool:
        return self.is_done and self.error is None


class _Broker:
    """What the fake producers write to, and which records they fail (by message ID, one error per attempt)."""

    def __init__(self) -> None:
        self.log: list[tuple[bytes | None, str]] = []
        self.attempts: Counter[str] = Counter()
        self.errors: dict[str, list[BaseException]] = defaultdict(list)
        self.producers = 0
        #: Producers created after this many fail as kafka-python's do when no broker answers.
        self.max_producers: int | None = None

    def producer(self, **settings: Any) -> _FakeProducer:
        if self.max_producers is not None and self.producers >= self.max_producers:
            raise TransientError("no Kafka broker answers")
        self.producers += 1
        return _FakeProducer(self)


class _FakeProducer:
    def __init__(self, broker: _Broker) -> None:
        self.broker = broker
        self.queued: list[tuple[str, bytes | None, str, _Future]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
             partition: int | None = None) -> _Future:
        future = _Future()
        self.queued.append((topic, key, dict(headers)["message-id"].decode(), future))
        return future

    @staticmethod
    def outcome(future: _Future) -> BaseException | None:
        return future.error

    def flush(self, timeout_s: float | None = None) -> None:
        # A partition per (topic, key): after a failure, its later records fail too, as the
        # idempotent producer's later batches do (out of order sequence, or a batch-mate's error).
        failed: dict[tuple[str, bytes | None], BaseException] = {}
        for topic, key, message_id, future in self.queued:
            self.broker.attempts[message_id] += 1
            future.is_done = True
            if (topic, key) in failed:
                future.error = kafka.errors.KafkaError("part of a batch which had an invalid record") \
                    if not isinstance(failed[topic, key], kafka.errors.KafkaTimeoutError) \
                    else kafka.errors.KafkaTimeoutError("expired behind a failed batch")
                continue
            errors = self.broker.errors.get(message_id)
            if errors:
                future.error = failed[topic, key] = errors.pop(0) if len(errors) > 1 or not getattr(
                    errors[0], "forever", False) else errors[0]
                continue
            self.broker.log.append((key, message_id))
        self.queued = []

    def close(self) -> None:
        self.queued = []


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> _Broker:
    fake = _Broker()
    monkeypatch.setattr(outbox_module._kafka, "RecordProducer", fake.producer)
    return fake


def _forever(error: BaseException) -> BaseException:
    error.forever = True  # type: ignore[attr-defined]
    return error


def _ordered(log: list[tuple[bytes | None, str]]) -> dict[bytes | None, list[str]]:
    ordered: dict[bytes | None, list[str]] = {}
    for key, message_id in log:
        ordered.setdefault(key, []).append(message_id)
    return ordered


@pytest.mark.timeout(60)
def test_a_transient_failure_is_retried_with_backoff_and_delivered_in_order(
    broker: _Broker, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """a2 times out twice: a1 and the other keys go once, a3 waits; the relay backs off, then a2 and a3 go."""
    engine = engine_for(database_url)
    ids = _publish(engine, "t", [("a1", b"a", b"v"), ("b1", b"b", b"v"), ("a2", b"a", b"v"), ("a3", b"a", b"v"),
                                 ("b2", b"b", b"v")])
    broker.errors["a2"] = [kafka.errors.KafkaTimeoutError("no ack"), kafka.errors.KafkaTimeoutError("no ack")]
    relay = Relay(engine, "fake:9092")
    with pytest.raises(TransientError, match=r"2 outbox row\(s\) not acknowledged \(3 sent\)"):
        relay.run_once()
    assert _states(engine) == {"a1": "sent", "b1": "sent", "a2": "pending", "a3": "pending", "b2": "sent"}
    assert broker.log == [(b"a", "a1"), (b"b", "b1"), (b"b", "b2")]

    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,),
                              kwargs={"idle_wait": timedelta(milliseconds=20), "max_backoff": timedelta(seconds=1)})
    with caplog.at_level(logging.WARNING, logger="exactlyonce"):
        thread.start()
        try:
            wait_until(lambda: _states(engine) == dict.fromkeys(ids, "sent"), 30, "every row sent")
        finally:
            stop.set()
            thread.join(10)
            relay.close()
    assert any("not acknowledged" in r.getMessage() and "retrying in" in r.getMessage() for r in caplog.records)
    assert _ordered(broker.log) == {b"a": ["a1", "a2", "a3"], b"b": ["b1", "b2"]}
    assert len(broker.log) == len(ids), "nothing sent twice"
    assert broker.attempts["a2"] == 3
    assert relay.refused == 0
    engine.dispose()


@pytest.mark.timeout(60)
def test_a_refusal_behind_acknowledged_rows_parks_its_key_until_released_or_discarded(
    broker: _Broker, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid record refused in the same flush as its key's next row: that row is not lost or overtaken;
    release sends both in order; discard drops a refused row and lets its key go on."""
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", database_url)
    engine = engine_for(database_url)
    ids = _publish(engine, "t", [("a1", b"a", b"v"), ("b1", b"b", b"v"), ("a2", b"a", b"v"), ("a3", b"a", b"v"),
                                 ("b2", b"b", b"v")])
    broker.errors["a2"] = [_forever(kafka.errors.InvalidRecordError("compacted topic needs a key"))]
    relay = Relay(engine, "fake:9092")
    # Rows as large as one already acknowledged go in one flush: a2 and a3 together, and a3 fails with
    # a2. Both are tried again alone: a2 is refused, a3 waits behind it.
    assert relay.run_once() == 4
    assert _states(engine) == {"a1": "sent", "b1": "sent", "a2": "refused", "a3": "pending", "b2": "sent"}
    assert relay.run_once() == 0, "a3 waits behind the refused a2"
    assert broker.log == [(b"a", "a1"), (b"b", "b1"), (b"b", "b2")]
    with engine.connect() as conn:
        reason = conn.execute(sa.select(outbox.c.refusal).where(outbox.c.id == ids["a2"])).scalar_one()
    assert reason == "InvalidRecordError: compacted topic needs a key"

    assert (broker.attempts["a2"], broker.attempts["a3"]) == (2, 1), "a2 tried again alone, a3 not"

    del broker.errors["a2"]  # the operator fixed the cause
    code, _, err = cli(capsys, "outbox", "release")
    assert code == 2 and "--all" in err
    code, out, err = cli(capsys, "outbox", "release", "--all", "--json")
    assert code == 0, err
    assert json.loads(out) == {"released": 1, "refused": []}
    assert relay.run_once() == 2
    assert _ordered(broker.log) == {b"a": ["a1", "a2", "a3"], b"b": ["b1", "b2"]}

    # Refused for good: the operator discards it, and the row behind it goes.
    more = _publish(engine, "t", [("c1", b"c", b"v" * 10), ("c2", b"c", b"v")])
    broker.errors["c1"] = [_forever(kafka.errors.TopicAuthorizationFailedError("t"))]
    assert relay.run_once() == 1
    assert _states(engine)["c1"] == "refused" and _states(engine)["c2"] == "pending"
    code, out, err = cli(capsys, "outbox", "release", str(more["c1"]))
    assert code == 0 and "released 1" in out, err
    assert relay.run_once() == 1, "refused again"
    (refused,) = outbox_module.refused(engine)
    assert (refused.message_id, refused.waiting) == ("c1", 1)
    assert "TopicAuthorizationFailedError" in refused.reason
    code, out, err = cli(capsys, "outbox", "discard", str(more["c1"]), str(ids["a1"]))
    assert code == 0, err
    assert "discarded 1 refused outbox row" in out, "a1 was sent, not refused: left alone"
    assert relay.run_once() == 1
    assert "c1" not in _states(engine) and _states(engine)["c2"] == "sent"
    assert broker.log[-1] == (b"c", "c2") and broker.attempts["c1"] == 2
    relay.close()
    engine.dispose()


@pytest.mark.timeout(60)
def test_rows_acknowledged_before_the_broker_went_away_are_marked_sent(broker: _Broker, database_url: str) -> None:
    """b1 times out, and the producer that would send c1 cannot connect: a1, acknowledged before, is marked sent."""
    engine = engine_for(database_url)
    _publish(engine, "t", [("a1", b"a", b"v"), ("b1", b"b", b"v"), ("c1", b"c", b"larger")])
    broker.errors["b1"] = [kafka.errors.KafkaTimeoutError("no ack")]
    broker.max_producers = 1
    relay = Relay(engine, "fake:9092")
    with pytest.raises(TransientError, match=r"2 outbox row\(s\) not acknowledged \(1 sent\): KafkaTimeoutError"):
        relay.run_once()
    assert _states(engine) == {"a1": "sent", "b1": "pending", "c1": "pending"}
    broker.max_producers = None
    assert relay.run_once() == 2
    assert broker.log == [(b"a", "a1"), (b"b", "b1"), (b"c", "c1")]
    engine.dispose()


@pytest.mark.timeout(60)
def test_a_row_refused_before_it_is_queued_stops_its_key_in_the_same_flush(
    broker: _Broker, database_url: str
) -> None:
    """The client refuses a row at send() (larger than max_request_size): the later rows of its key are not sent."""
    engine = engine_for(database_url)
    _publish(engine, "t", [("a1", b"a", b"v"), ("a2", b"a", b"v"), ("a3", b"a", b"v"), ("b1", b"b", b"v")])
    relay = Relay(engine, "fake:9092")
    real_send = _FakeProducer.send

    def send(self: _FakeProducer, topic: str, **kwargs: Any) -> _Future:
        future = real_send(self, topic, **kwargs)
        if self.queued[-1][2] == "a2":
            self.queued.pop()
            future.is_done, future.error = True, kafka.errors.MessageSizeTooLargeError("larger than max_request_size")
        return future

    relay._dispatcher.proven["t"] = 10**6  # every row proven small enough: a1, a2 and a3 would share a flush
    try:
        _FakeProducer.send = send  # type: ignore[method-assign]
        assert relay.run_once() == 3
    finally:
        _FakeProducer.send = real_send  # type: ignore[method-assign]
    assert _states(engine) == {"a1": "sent", "a2": "refused", "a3": "pending", "b1": "sent"}
    assert broker.log == [(b"a", "a1"), (b"b", "b1")]
    engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_outbox_table_without_the_refusal_columns_asks_for_an_upgrade(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At revision 0004 the relay command refuses to start, App's relay thread does not start,
    and status asks for an upgrade."""
    engine = engine_for(database_url)
    migrate.downgrade(engine, "0004")
    with pytest.raises(ConfigurationError, match=r"refused_at, refusal.*db upgrade"):
        outbox_module.require_columns(engine)
    thread = RelayThread(engine, "127.0.0.1:1", {})
    with caplog.at_level(logging.ERROR, logger="exactlyonce"):
        thread.start()
        wait_until(lambda: any("lacks column(s) refused_at, refusal" in r.getMessage() for r in caplog.records),
                   10, "the relay thread to give up")
        thread.stop()
    # status reads columns of later revisions too (0006): it says to upgrade rather than fail mid-read.
    with pytest.raises(ConfigurationError, match="db upgrade"):
        status(engine, None)
    migrate.upgrade(engine)
    outbox_module.require_columns(engine)
    engine.dispose()
