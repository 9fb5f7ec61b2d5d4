"""In-memory twins of the broker, the group consumer and the dead-letter producer.

For the runtime's own tests (the model-based test, the booking and sequence
tests); the base of a test kit for users to come. Like :mod:`exactlyonce._kafka`,
this module imports kafka-python: the twins stand in for its clients and raise
its errors.

The runner talks to Kafka through two wrappers of :mod:`exactlyonce._kafka`:
:class:`~exactlyonce._kafka.Consumer` (``poll``, ``assignment``, ``seek``,
``commit``, ``commit_async``, ``highwater``, ``close``, and the revocation
callback it calls inside ``poll``) and
:class:`~exactlyonce._kafka.RecordProducer` (``publish``, ``close``). The twins
here *subclass* those wrappers and replace only the kafka-python client
inside them, so the wrappers' own translations stay under test: a retriable
poll error becomes ``TransientError``, a failed offset commit returns
``False``, a retriable publish failure becomes ``TransientError`` and a
permanent refusal a ``ConfigurationError``.

``Runner(app, stop, consumer_factory=cluster.consumer_factory(),
producer_factory=cluster.producer_factory())`` runs against a :class:`Cluster`:

- the log: topics of partitions of :class:`TwinRecord` (key, value, headers,
  offset, timestamp); producing to an unknown topic creates it (1 partition);
- groups: committed offsets and a generation. A member joins at its first
  poll, gets every partition of its topics and starts from the committed
  offsets (earliest when none). A new member of the same group (a restart
  after a crash) makes the old one stale: its commits fail with
  ``CommitFailedError`` and its next poll reports its partitions lost, then
  rejoins (again from the committed offsets), as an evicted member would;
- faults, armed by the test and spent as they fire: a crash (:class:`Crash`,
  a ``BaseException``, so nothing in the runner catches it, and the twin then
  refuses every further call, like a dead process) before or after an offset
  commit or a dead-letter publish; a failing offset commit
  (``RebalanceInProgressError``); failing polls (a cut connection); a
  rebalance at the next poll (eager: everything revoked, then reassigned
  from the committed offsets); publish refusals (``KafkaTimeoutError``:
  retriable, ``TopicAuthorizationFailedError``: permanent) and a publish
  appended whose acknowledgement is lost.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kafka.errors

from exactlyonce._kafka import Consumer, RecordProducer, TopicPartition

__all__ = [
    "CRASH_AFTER",
    "CRASH_BEFORE",
    "LOST_ACK",
    "REFUSE",
    "Cluster",
    "Crash",
    "FastStop",
    "TopicPartition",
    "TwinConsumer",
    "TwinProducer",
    "TwinRecord",
    "VirtualTime",
]


class Crash(BaseException):
    """The worker process died here (nothing in the runner catches a ``BaseException``)."""


@dataclass(frozen=True)
class TwinRecord:
    """A record in the twin log, shaped like kafka-python's ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int

    def header(self, name: str) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


#: Commit faults (``Cluster.commit_faults``): crash before the offsets are
#: stored, crash right after, or refuse the commit (a rebalance in progress).
CRASH_BEFORE, CRASH_AFTER, REFUSE = "crash-before", "crash-after", "refuse"
#: A publish fault: the record is appended but its acknowledgement is lost (a timeout).
LOST_ACK = "lost-ack"


@dataclass
class Cluster:
    """The broker: topics, groups' committed offsets and generations, and the armed faults."""

    log: dict[TopicPartition, list[TwinRecord]] = field(default_factory=dict)
    committed: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    #: Every successful offset commit: (group, partition, offset), in order.
    commit_history: list[tuple[str, TopicPartition, int]] = field(default_factory=list)
    clock_ms: int = 1_700_000_000_000
    #: Every consumer created, in order (the last one is the current member).
    members: list[TwinConsumer] = field(default_factory=list)
    #: Every producer's kafka-python stand-in, in order.
    producers: list[_FakeKafkaProducer] = field(default_factory=list)

    # -- faults, spent as they fire --
    #: Next offset commits (sync or async): CRASH_BEFORE, CRASH_AFTER, REFUSE, None (succeed), or
    #: a callable run first (e.g. another member taking over), then the commit proceeds.
    commit_faults: list[str | None] = field(default_factory=list)
    #: Next polls that fail as a lost connection (True) or work (False).
    poll_faults: list[bool] = field(default_factory=list)
    #: The current member revokes everything and rejoins at its next poll.
    rebalance_pending: bool = False
    #: The partitions the next join gets (None: all; the others stay with a
    #: member outside the test, until a later join).
    assign_only: set[TopicPartition] | None = None
    #: A clock for the runner (see :class:`VirtualTime`): an empty poll waits its whole timeout.
    now_s: float = 1000.0
    #: Next dead-letter sends: CRASH_BEFORE / CRASH_AFTER (the append), LOST_ACK,
    #: a Kafka error class to refuse with, or None (succeed).
    publish_faults: list[Any] = field(default_factory=list)
    #: Called before every poll of the members created while it is set (e.g. to stop the runner);
    #: True: the poll returns nothing.
    before_poll: Callable[[TwinConsumer], bool] | None = None
    #: Called after every record a producer appended.
    on_append: Callable[[TwinRecord], None] | None = None

    # -- the log --

    def create_topic(self, name: str, partitions: int = 1) -> None:
        for p in range(partitions):
            self.log.setdefault(TopicPartition(name, p), [])

    def partitions(self, topic: str) -> list[TopicPartition]:
        return sorted(tp for tp in self.log if tp.topic == topic)

    def append(
        self,
        topic: str,
        partition: int | None = None,
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> TwinRecord:
        if not self.partitions(topic):
            self.create_topic(topic)
        tp = TopicPartition(topic, partition if partition is not None else 0)
        if tp not in self.log:
            raise kafka.errors.UnknownTopicOrPartitionError(f"{tp}")
        self.clock_ms += 1
        record = TwinRecord(topic, tp.partition, len(self.log[tp]), key, value, list(headers), self.clock_ms)
        self.log[tp].append(record)
        if self.on_append is not None:
            self.on_append(record)
        return record

    def records(self, topic: str) -> list[TwinRecord]:
        return [record for tp in self.partitions(topic) for record in self.log[tp]]

    def end_offset(self, tp: TopicPartition) -> int:
        return len(self.log[tp])

    # -- groups --

    def committed_offset(self, group: str, tp: TopicPartition) -> int:
        return self.committed.get(group, {}).get(tp, 0)

    def join(self, group: str) -> int:
        """A member joins: a new generation, which makes every earlier member stale."""
        self.generations[group] = self.generations.get(group, 0) + 1
        return self.generations[group]

    def store_offsets(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self.committed.setdefault(group, {})[tp] = offset
            self.commit_history.append((group, tp, offset))

    # -- factories for Runner --

    def consumer_factory(self) -> Callable[..., TwinConsumer]:
        return functools.partial(TwinConsumer, cluster=self)

    def producer_factory(self) -> Callable[..., TwinProducer]:
        return functools.partial(TwinProducer, cluster=self)


class _FakeKafkaConsumer:
    """The part of kafka-python's ``KafkaConsumer`` that :class:`Consumer` uses."""

    def __init__(self, cluster: Cluster, group: str, topics: list[str], max_poll_records: int,
                 owner: TwinConsumer) -> None:
        self.cluster = cluster
        self.group = group
        self.topics = topics
        self.max_poll_records = max_poll_records
        self.owner = owner
        self.generation: int | None = None
        self.assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.dead = False
        self.closed = False
        self.polls = 0

    # -- membership --

    @property
    def stale(self) -> bool:
        return self.generation is not None and self.generation != self.cluster.generations.get(self.group)

    def _join(self) -> None:
        self.generation = self.cluster.join(self.group)
        self.assigned = {tp for topic in self.topics for tp in self.cluster.partitions(topic)}
        if self.cluster.assign_only is not None:
            self.assigned &= self.cluster.assign_only
            self.cluster.assign_only = None
        self.positions = {tp: self.cluster.committed_offset(self.group, tp) for tp in self.assigned}
        self.owner.assigned_log.append(set(self.assigned))

    def _alive(self) -> None:
        if self.dead:
            raise Crash("this worker crashed before")
        if self.closed:
            raise kafka.errors.IllegalStateError("consumer closed")

    # -- what Consumer calls --

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[TwinRecord]]:
        self._alive()
        self.polls += 1
        if self.owner.before_poll is not None and self.owner.before_poll(self.owner):
            return {}
        if self.cluster.poll_faults and self.cluster.poll_faults.pop(0):
            raise kafka.errors.KafkaConnectionError("twin: connection to the broker cut")
        if self.generation is None:
            self._join()
        elif self.stale:
            lost, self.assigned = set(self.assigned), set()
            self.owner.on_revoked_callback(lost, True)
            self._join()
        elif self.cluster.rebalance_pending:
            self.cluster.rebalance_pending = False
            # Eager: everything is revoked while this member still owns it, then reassigned.
            self.owner.on_revoked_callback(set(self.assigned), False)
            self._join()
        batch: dict[TopicPartition, list[TwinRecord]] = {}
        room = self.max_poll_records
        for tp in sorted(self.assigned):
            records = self.cluster.log[tp][self.positions[tp] : self.positions[tp] + room]
            if records:
                batch[tp] = records
                self.positions[tp] += len(records)
                room -= len(records)
            if room <= 0:
                break
        # An empty poll waits its whole timeout (kafka-python rounds it down to milliseconds: one more).
        self.cluster.now_s += 0.001 if batch else (timeout_ms + 1) / 1000
        return batch

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        if tp not in self.assigned:
            raise kafka.errors.IllegalStateError("Partition is not assigned")
        return self.cluster.end_offset(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._alive()
        if not isinstance(offset, int) or offset < 0:
            raise ValueError("Offset must be int >= 0")
        if tp not in self.assigned:
            raise ValueError("Unassigned partition")
        self.positions[tp] = offset

    def _commit(self, offsets: Mapping[TopicPartition, Any]) -> None:
        self._alive()
        fault = self.cluster.commit_faults.pop(0) if self.cluster.commit_faults else None
        if callable(fault):
            fault()
            fault = None
        if fault == CRASH_BEFORE:
            self.dead = True
            raise Crash("crashed before the offset commit")
        if fault == REFUSE:
            raise kafka.errors.RebalanceInProgressError("twin: the group is rebalancing")
        if self.stale or self.generation is None:
            raise kafka.errors.CommitFailedError("twin: this member is no longer in the group")
        self.cluster.store_offsets(self.group, {tp: meta.offset for tp, meta in offsets.items()})
        if fault == CRASH_AFTER:
            self.dead = True
            raise Crash("crashed after the offset commit")

    def commit(self, offsets: Mapping[TopicPartition, Any]) -> None:
        self._commit(offsets)

    def commit_async(self, offsets: Mapping[TopicPartition, Any], callback: Callable[[Any, Any], None]) -> None:
        try:
            self._commit(offsets)
        except kafka.errors.KafkaError as exc:
            callback(offsets, exc)
        else:
            callback(offsets, None)

    def close(self, autocommit: bool = False) -> None:
        self._alive()
        assert not autocommit
        self.closed = True


class TwinConsumer(Consumer):
    """:class:`Consumer` over the twin cluster (its kafka-python client replaced)."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str,
        topics: Iterable[str],
        config: Mapping[str, Any],
        on_revoked: Callable[[set[TopicPartition], bool], None],
        cluster: Cluster,
    ) -> None:
        self.cluster = cluster
        self.group_id = group_id
        self.on_revoked = on_revoked
        self.before_poll = cluster.before_poll
        #: Each assignment this member received, in order.
        self.assigned_log: list[set[TopicPartition]] = []
        max_poll = int(config.get("max_poll_records", 500))
        self._consumer = _FakeKafkaConsumer(cluster, group_id, sorted(topics), max_poll, self)
        cluster.members.append(self)

    def on_revoked_callback(self, partitions: set[TopicPartition], lost: bool) -> None:
        # As kafka-python's listener through Consumer: exceptions are logged, not raised.
        self._call_safely(self.on_revoked, partitions, lost)

    @property
    def fake(self) -> _FakeKafkaConsumer:
        return cast(_FakeKafkaConsumer, self._consumer)


class _Future:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.is_done = True
        self.exception = error

    def succeeded(self) -> bool:
        return self.error is None

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class _FakeKafkaProducer:
    """The part of kafka-python's ``KafkaProducer`` that :class:`RecordProducer` uses."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.closed = False
        self.dead = False

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
             partition: int | None = None) -> _Future:
        if self.dead:
            raise Crash("this worker crashed before")
        if self.closed:
            raise kafka.errors.IllegalStateError("producer closed")
        fault = self.cluster.publish_faults.pop(0) if self.cluster.publish_faults else None
        if fault == CRASH_BEFORE:
            self.dead = True
            raise Crash("crashed before the dead letter was sent")
        if isinstance(fault, type) and issubclass(fault, kafka.errors.KafkaError):
            return _Future(fault(f"twin: {topic} refused the record"))
        self.cluster.append(topic, partition, key=key, value=value, headers=headers)
        if fault == LOST_ACK:
            return _Future(kafka.errors.KafkaTimeoutError("twin: appended, but no acknowledgement came"))
        if fault == CRASH_AFTER:
            self.dead = True
            return _Future(Crash("crashed after the dead letter was acknowledged"))
        return _Future(None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class TwinProducer(RecordProducer):
    """:class:`RecordProducer` over the twin cluster (its kafka-python client replaced)."""

    def __init__(self, *, bootstrap_servers: str, config: Mapping[str, Any], cluster: Cluster) -> None:
        self.cluster = cluster
        self._producer = _FakeKafkaProducer(cluster)
        cluster.producers.append(self._producer)


class VirtualTime:
    """Stands in for the ``time`` module of the runtime's loop: ``monotonic()`` is the cluster's clock."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def monotonic(self) -> float:
        return self._cluster.now_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class FastStop(threading.Event):
    """A stop event whose waits return at once: the runner's backoffs take no time."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()
