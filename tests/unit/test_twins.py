"""The in-memory twins of the broker, consumer and producer (exactlyonce/testing.py) behave like the real ones."""

from __future__ import annotations

from typing import Any

import kafka.errors
import pytest

from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.testing import CRASH_AFTER, CRASH_BEFORE, REFUSE, Cluster, Crash, TopicPartition, TwinConsumer

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


def _cluster() -> Cluster:
    cluster = Cluster()
    cluster.create_topic("t", 2)
    for i in range(3):
        cluster.append("t", 0, value=b"a%d" % i)
        cluster.append("t", 1, value=b"b%d" % i)
    return cluster


def _consumer(cluster: Cluster, revoked: list[Any] | None = None, max_poll: int = 500) -> TwinConsumer:
    calls = revoked if revoked is not None else []
    return cluster.consumer_factory()(
        bootstrap_servers="twin", group_id="g", topics=["t"], config={"max_poll_records": max_poll},
        on_revoked=lambda tps, lost: calls.append((tps, lost)),
    )


def _values(batch: dict[TopicPartition, list[Any]]) -> dict[int, list[bytes]]:
    return {tp.partition: [r.value for r in records] for tp, records in batch.items()}


def test_consumer_serves_from_committed_offsets_and_a_new_member_takes_over() -> None:
    cluster = _cluster()
    first = _consumer(cluster)
    assert _values(first.poll(0)) == {0: [b"a0", b"a1", b"a2"], 1: [b"b0", b"b1", b"b2"]}
    assert first.assignment() == {TP0, TP1}
    assert first.highwater(TP0) == 3
    assert first.commit({TP0: 2})
    assert cluster.committed_offset("g", TP0) == 2
    revoked: list[Any] = []
    second = _consumer(cluster, revoked)  # a restart: starts from the committed offsets
    assert _values(second.poll(0)) == {0: [b"a2"], 1: [b"b0", b"b1", b"b2"]}
    assert not first.commit({TP0: 3})  # stale member: CommitFailedError -> False
    assert cluster.committed_offset("g", TP0) == 2
    first_revoked: list[Any] = []
    first.on_revoked = lambda tps, lost: first_revoked.append((tps, lost))
    first.poll(0)  # the stale member learns it lost its partitions, and rejoins
    assert first_revoked == [({TP0, TP1}, True)]
    assert not second.commit({TP0: 3})


def test_seek_rewinds_and_refuses_unassigned_partitions() -> None:
    cluster = _cluster()
    consumer = _consumer(cluster, max_poll=2)
    assert _values(consumer.poll(0)) == {0: [b"a0", b"a1"]}
    consumer.seek(TP0, 1)
    assert _values(consumer.poll(0)) == {0: [b"a1", b"a2"]}
    with pytest.raises(ValueError, match="Unassigned"):
        consumer.seek(TopicPartition("other", 0), 0)


def test_rebalance_revokes_everything_then_resumes_from_committed() -> None:
    cluster = _cluster()
    revoked: list[Any] = []
    consumer = _consumer(cluster, revoked)
    consumer.poll(0)
    consumer.commit({TP0: 1, TP1: 3})
    cluster.rebalance_pending = True
    assert _values(consumer.poll(0)) == {0: [b"a1", b"a2"]}
    assert revoked == [({TP0, TP1}, False)]


def test_poll_and_commit_faults_are_translated_like_kafka_python_errors() -> None:
    cluster = _cluster()
    consumer = _consumer(cluster)
    cluster.poll_faults = [True]
    with pytest.raises(TransientError):
        consumer.poll(0)
    consumer.poll(0)
    cluster.commit_faults = [REFUSE]
    assert not consumer.commit({TP0: 1})
    assert consumer.commit({TP0: 1})


@pytest.mark.parametrize(("fault", "stored"), [(CRASH_BEFORE, 0), (CRASH_AFTER, 1)])
def test_a_crash_at_the_offset_commit_kills_the_consumer(fault: str, stored: int) -> None:
    cluster = _cluster()
    consumer = _consumer(cluster)
    consumer.poll(0)
    cluster.commit_faults = [fault]
    with pytest.raises(Crash):
        consumer.commit({TP0: 1})
    assert cluster.committed_offset("g", TP0) == stored
    with pytest.raises(Crash):
        consumer.poll(0)
    with pytest.raises(Crash):
        consumer.close()


def test_producer_appends_refuses_and_crashes() -> None:
    cluster = Cluster()
    producer = cluster.producer_factory()(bootstrap_servers="twin", config={})
    producer.publish("t.dlq", key=b"k", value=b"v", headers=[("h", b"1")])
    (record,) = cluster.records("t.dlq")
    assert (record.key, record.value, record.header("h"), record.offset) == (b"k", b"v", b"1", 0)
    cluster.publish_faults = [kafka.errors.KafkaTimeoutError]
    with pytest.raises(TransientError, match=r"publish to 't\.dlq' failed"):
        producer.publish("t.dlq", key=None, value=b"x", headers=[])
    cluster.publish_faults = [kafka.errors.TopicAuthorizationFailedError]
    with pytest.raises(ConfigurationError, match=r"topic 't\.dlq' refuses the record for good"):
        producer.publish("t.dlq", key=None, value=b"x", headers=[])
    assert len(cluster.records("t.dlq")) == 1
    cluster.publish_faults = [CRASH_AFTER]
    with pytest.raises(Crash):
        producer.publish("t.dlq", key=None, value=b"y", headers=[])
    assert [r.value for r in cluster.records("t.dlq")] == [b"v", b"y"]  # sent, then the worker died
    with pytest.raises(Crash):
        producer.publish("t.dlq", key=None, value=b"z", headers=[])
    other = cluster.producer_factory()(bootstrap_servers="twin", config={})
    cluster.publish_faults = [CRASH_BEFORE]
    with pytest.raises(Crash):
        other.publish("t.dlq", key=None, value=b"w", headers=[])
    assert len(cluster.records("t.dlq")) == 2


def test_partial_reassignment_a_takeover_at_commit_and_the_clock() -> None:
    cluster = _cluster()
    revoked: list[Any] = []
    consumer = _consumer(cluster, revoked, max_poll=1)
    consumer.poll(0)
    cluster.rebalance_pending, cluster.assign_only = True, {TP1}
    assert _values(consumer.poll(0)) == {1: [b"b0"]}
    assert consumer.assignment() == {TP1}
    with pytest.raises(ValueError, match="Unassigned"):
        consumer.seek(TP0, 0)
    before = cluster.now_s
    consumer.poll(0.5)  # returns a record: the clock barely moves
    cluster.log[TP1] = cluster.log[TP1][:2]  # nothing left to read
    consumer.poll(0.5)  # an empty poll waits its whole timeout
    assert cluster.now_s - before > 0.5
    takeover = _consumer(cluster)
    cluster.commit_faults = [lambda: takeover.poll(0)]  # another member joins during the commit
    assert not consumer.commit({TP1: 2})
    assert cluster.committed_offset("g", TP1) == 0
