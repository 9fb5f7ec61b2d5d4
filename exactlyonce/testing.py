"""Testing a service: handlers run on the real runtime with no broker, and workers for end-to-end tests.

:class:`TestApp` runs an :class:`~exactlyonce.App`'s handlers on the real
claim/handle/dead-letter path, synchronously, with an in-memory broker (the
twins below) and a real database::

    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        t.send("transfers", {"transfer_id": "t1", "from": "a", "to": "b", "amount": 5})
        assert t.outcomes == ["applied"]

:class:`Worker` runs ``app.run()`` in a thread against a real broker, for
end-to-end tests; :func:`fresh_database` makes a throwaway database on a
PostgreSQL or MySQL/MariaDB server; :func:`docker_available` says whether
testcontainers can run. The pytest plugin (:mod:`exactlyonce.pytest_plugin`)
wraps them in fixtures. docs/testing.md, "Testing your service", shows them
at work.

**The in-memory twins** of the broker, the group consumer and the
dead-letter producer are what :class:`TestApp` and the runtime's own tests
(the model-based test, the booking and sequence tests) run
:class:`~exactlyonce.runtime.Runner` against. Like :mod:`exactlyonce._kafka`, this module imports kafka-python:
the twins stand in for its clients and raise its errors.

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
producer_factory=cluster.producer_factory())`` runs against a :class:`Cluster`
(``cluster.run_until_read(app)`` runs one such worker until everything is read):

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

import contextlib
import functools
import importlib
import json
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import kafka.errors
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from exactlyonce import ids, signing
from exactlyonce._kafka import Consumer, RecordProducer, TopicPartition
from exactlyonce.app import App
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.handler import Handler
from exactlyonce.message import headers_from_json
from exactlyonce.metrics import Metrics
from exactlyonce.outcome import Outcome
from exactlyonce.producer import encode_value, new_message_id, stamp_headers
from exactlyonce.runtime import Runner, deadletter
from exactlyonce.runtime.booking import Entry, reason_of
from exactlyonce.signing import SigningKey
from exactlyonce.storage import engine as _db
from exactlyonce.storage import migrate
from exactlyonce.storage.schema import outbox

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CRASH_AFTER",
    "CRASH_BEFORE",
    "LOST_ACK",
    "MAX_REWINDS",
    "REFUSE",
    "Cluster",
    "Crash",
    "DeadLetterRecord",
    "Decision",
    "FastStop",
    "Origin",
    "PublishedRecord",
    "TestApp",
    "TopicPartition",
    "TwinConsumer",
    "TwinProducer",
    "TwinRecord",
    "VirtualTime",
    "Worker",
    "docker_available",
    "fresh_database",
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

    # -- a worker --

    def run_until_read(self, app: Any) -> Runner:
        """Run one real :class:`~exactlyonce.runtime.Runner` of ``app`` here until everything is read; return it.

        In this thread; it stops at the first poll that finds every assigned
        partition read to its end and no sequenced work left, commits and
        leaves the group (its ``stats`` tell what it decided).
        """
        stop = threading.Event()
        runner: Runner | None = None

        def before_poll(member: TwinConsumer) -> bool:
            fake = member.fake
            read = fake.generation is not None and all(
                fake.positions.get(tp, 0) >= self.end_offset(tp) for tp in fake.assigned)
            if read and runner is not None and not runner.more_work:
                stop.set()
                return True
            return False

        outer, self.before_poll = self.before_poll, before_poll
        try:
            runner = Runner(app, stop, poll_timeout_s=0.01, consumer_factory=self.consumer_factory(),
                            producer_factory=self.producer_factory())
            runner.run()
        finally:
            self.before_poll = outer
        return runner


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


# -- the test kit ---------------------------------------------------------------

#: How many times :meth:`TestApp.process` lets the runtime rewind a record (a
#: transient failure: the database locked or unreachable) before it gives up.
MAX_REWINDS = 3

#: The outcomes that decide a record (FINGERPRINT_MISMATCH is only booked besides one of them).
_DECIDING = frozenset(Outcome) - {Outcome.FINGERPRINT_MISMATCH}


class Origin(NamedTuple):
    """Where a record was read: ``(topic, partition, offset)``."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Decision:
    """One outcome the runtime booked and committed, as ``exactlyonce_counters`` and the metrics count it.

    A record gets one, and a sequenced record that was parked a second one
    when it is released (``applied``) or given up (``dead_lettered``); a known
    ID with another payload also books ``fingerprint_mismatch`` just before
    its final outcome.
    """

    #: Where the record was read.
    origin: Origin
    key: bytes | None
    value: bytes | None
    #: The ID the handler's strategy derived (``None``: none could be, e.g. a bad signature).
    message_id: str | None
    outcome: Outcome
    #: A dead letter's reason (``handler-error``, ``undecodable-value``, ...); ``None`` for other outcomes.
    reason: str | None = None
    #: What dead-lettered the record (the handler's exception, or the runtime's refusal).
    error: BaseException | None = None
    #: A sequenced record's stream and number (``None`` for other handlers).
    stream: str | None = None
    number: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A record the runtime sent to a dead-letter topic, its ``x-exactlyonce-*`` headers decoded.

    Parsed with :func:`exactlyonce.runtime.deadletter.split_headers`, as
    ``exactlyonce dlq list`` parses them.
    """

    #: The dead-letter topic it was sent to.
    topic: str
    key: bytes | None
    value: bytes | None
    #: The original record's headers (without the ``x-exactlyonce-*`` ones).
    headers: list[tuple[str, bytes]]
    #: The ``x-exactlyonce-*`` headers, prefix removed: ``reason``, ``error-type``, ``error-message``,
    #: ``topic``, ``partition``, ``offset``, ``message-id``, ``attempts``, ``scope``.
    meta: dict[str, str]

    @property
    def reason(self) -> str:
        """Why it was dead-lettered: ``undecodable-value``, ``handler-error``, ``bad-signature``, ..."""
        return self.meta.get("reason", "")

    @property
    def origin(self) -> Origin:
        """Where the original record was read."""
        return Origin(self.meta.get("topic", ""), int(self.meta.get("partition", "-1")),
                      int(self.meta.get("offset", "-1")))

    @property
    def error_type(self) -> str:
        """The class name of the exception that dead-lettered it."""
        return self.meta.get("error-type", "")

    @property
    def error_message(self) -> str:
        """The exception's text, redacted and cut as in the real dead letter."""
        return self.meta.get("error-message", "")

    @property
    def message_id(self) -> str | None:
        """The message ID the handler's strategy derived, if any."""
        return self.meta.get("message-id") or None

    @property
    def attempts(self) -> int:
        """How many times the handler ran for it (0: refused before any call)."""
        return int(self.meta.get("attempts", "0"))

    def json(self) -> Any:
        """The value decoded as JSON."""
        return json.loads(self.value or b"null")


@dataclass(frozen=True, slots=True)
class PublishedRecord:
    """A record stored with :func:`exactlyonce.publish`, as the outbox relay would send it.

    ``headers`` are what the relay stamps: the publisher's headers, then
    ``message-id``, then the signature headers when the App has a
    ``signing_key``.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    message_id: str

    def json(self) -> Any:
        """The value decoded as JSON."""
        return json.loads(self.value)


HeadersArg = Mapping[str, bytes | str] | Iterable[tuple[str, bytes | str]] | None


@dataclass
class _WorkerSettings:
    """What a :class:`~exactlyonce.runtime.Runner` reads of its App (its ``Settings`` protocol), for a TestApp."""

    group_id: str
    consumer_config: dict[str, Any]
    producer_config: dict[str, Any]
    transient_retry_budget: timedelta
    batch_wait: timedelta
    signing_keys: dict[str, bytes] | None
    metrics: Metrics
    stats: Counter[str]
    handlers: Mapping[str, Handler]
    bootstrap_servers: str
    engine: Engine
    #: The test database's URL (password included), for the async handlers' engine.
    url: str = ""
    lock_timeout: timedelta = timedelta(seconds=30)
    batch_lock_timeout: timedelta | None = None
    #: The async engine is made here, from ``url``: each run's event loop disposes of its pool.
    owns_async_engine: bool = True
    #: Unread: the TestApp gives the runner its twin consumer.
    kafka_client: str = "kafka-python"
    _async_engine: AsyncEngine | None = None

    @property
    def async_engine(self) -> AsyncEngine:
        """The async handlers' engine on the test database, made on first use (as ``App.async_engine``)."""
        if self._async_engine is None:
            self._async_engine = _db.create_async_engine(self.url, lock_timeout=self.lock_timeout)
        return self._async_engine


class TestApp:
    """Run an App's handlers on the real runtime, synchronously, with no broker; use as a context manager.

    ``with TestApp(app, database_url=...) as t:`` creates the framework's
    tables in the database (``exactlyonce db upgrade``; default: a temporary
    SQLite file, deleted on exit), or in the database of ``engine=`` (an
    engine your test configured, used as ``App(engine=...)`` uses one and
    never disposed of). The App's own ``database_url`` or engine is not
    used. Create your own tables with ``metadata.create_all(t.engine)``. Then each :meth:`send` puts a record
    on an in-memory topic and runs a real :class:`~exactlyonce.runtime.Runner`
    of the App's handlers over it (the App's group, scopes, retry policies,
    dead-letter topics, signing keys and lock timeout) until everything is
    read and decided, in the calling thread. It returns the record's outcome:
    the claim, the handler's transaction, the dead letters and the offset
    commits are those of a worker. Nothing runs in the background and no
    thread is started.

    What a test can look at:

    - :attr:`outcomes`: each record's outcome, in the order they were sent
      (``applied``, ``duplicate``, ``skipped``, ``dead_lettered``,
      ``parked``: :class:`~exactlyonce.outcome.Outcome` values, which compare
      equal to those strings); :attr:`decisions`: every outcome booked,
      released sequenced records among them;
    - :attr:`dead_letters`: what was sent to the dead-letter topics;
    - :attr:`published`: what the handlers stored with
      :func:`exactlyonce.publish`, as the relay would send it;
    - :meth:`session`: a session on the test database, to check the effects;
      :attr:`stats`: the runner's counters (as ``App.stats``).

    Differences from a worker: the App's ``batch_wait`` is not used (each
    :meth:`process` handles what was produced before it) and transient
    failures are not retried for ``transient_retry_budget``: a record the
    runtime rewinds more than :data:`MAX_REWINDS` times makes :meth:`process`
    raise :class:`~exactlyonce.TransientError`. Retry backoffs take no time.
    Gap timeouts of sequenced handlers run on the wall clock.

    ``signing_key`` (``(key id, secret)``): sign every record sent, as
    ``exactlyonce.Producer(signing_key=...)`` does; for an App with
    ``signing_keys``.
    """

    # Not a test class, though its name starts with "Test".
    __test__ = False

    def __init__(
        self,
        app: App,
        database_url: str | None = None,
        *,
        engine: Engine | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(f"TestApp needs an exactlyonce.App, got {type(app).__name__}")
        if engine is not None and database_url is not None:
            raise ConfigurationError("give TestApp a database_url or an engine, not both")
        if not app.handlers:
            raise ConfigurationError("the App has no handlers registered")
        self.app = app
        self._signing_key = signing.check_signing_key(signing_key) if signing_key is not None else None
        self._database_url = database_url
        self._given_engine = engine
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._engine: Engine | None = None
        self._closed = False
        self._outbox_start = 0
        #: The in-memory broker (see :class:`Cluster`): its log, committed offsets and armed faults.
        self.cluster = Cluster()
        for topic in app.handlers:
            self.cluster.create_topic(topic)
        self.cluster.on_append = self._appended
        self._dead_letter_topics = {handler.dead_letter_topic for handler in app.handlers.values()}
        self._pending: list[TwinRecord] = []
        #: Each record's outcome, in the order the records were produced.
        self.outcomes: list[Outcome] = []
        #: Every outcome booked, in the order the runtime committed them.
        self.decisions: list[Decision] = []
        #: The records sent to dead-letter topics, in order.
        self.dead_letters: list[DeadLetterRecord] = []
        #: Records by outcome and dead letters by reason, as ``App.stats`` counts them.
        self.stats: Counter[str] = Counter()
        #: The Prometheus metrics of the runs (a registry of this TestApp's own).
        self.metrics = Metrics()

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> TestApp:
        if self._engine is not None or self._closed:
            raise ConfigurationError("a TestApp can be entered once")
        url = self._database_url
        if url is None and self._given_engine is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="exactlyonce-test-")
            url = f"sqlite:///{Path(self._temporary.name) / 'test.db'}"
        try:
            if self._given_engine is not None:
                self._engine = _db.adopt_engine(
                    self._given_engine, lock_timeout=self.app.lock_timeout,
                    idle_in_transaction_timeout=self.app.idle_in_transaction_timeout, lock_timeout_given=False,
                )
            else:
                self._engine = _db.create_engine(
                    url or "", lock_timeout=self.app.lock_timeout,
                    idle_in_transaction_timeout=self.app.idle_in_transaction_timeout,
                )
            migrate.upgrade(self._engine)
            with self._engine.connect() as conn:
                self._outbox_start = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(outbox.c.id), 0)))
                                         .scalar_one())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Dispose of the engine (not one given) and delete the temporary database, if any (``__exit__`` does it)."""
        self._closed = True
        if self._engine is not None and self._given_engine is None:
            self._engine.dispose()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    @property
    def engine(self) -> Engine:
        """The test database's engine, configured as the App's workers configure theirs."""
        if self._engine is None or self._closed:
            raise ConfigurationError("use the TestApp inside its with block")
        return self._engine

    @property
    def database_url(self) -> str:
        """The test database's URL (with its password)."""
        return self.engine.url.render_as_string(hide_password=False)

    def session(self) -> Session:
        """A new session on the test database, to check what the handlers did (close it before sending more)."""
        return Session(self.engine)

    # -- records --------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | str | Any,
        *,
        key: bytes | str | None = None,
        headers: HeadersArg = None,
        message_id: str | None = None,
        partition: int = 0,
    ) -> Outcome:
        """Produce one record and run the handlers until it is decided; return its outcome.

        ``value``: bytes as they are, text as UTF-8, ``None`` as a null value
        (a tombstone), anything else as compact JSON with sorted keys (as
        :meth:`exactlyonce.Producer.send` encodes it). ``key``: bytes or text.
        ``headers``: ``(name, value)`` pairs or a mapping, values bytes or
        text.

        The record is sent as given, as a plain Kafka producer would send it:
        no ``message-id`` header is added unless ``message_id`` is given (it
        then replaces any in ``headers``, as ``exactlyonce.Producer`` sets
        it). With the TestApp's ``signing_key`` the record is signed as
        ``exactlyonce.Producer`` signs it: over its message ID (``message_id``,
        else its ``message-id`` header, else a new one is added), key and value.

        Records produced with :meth:`produce` and not yet processed are
        processed first, in the same run.
        """
        self.produce(topic, value, key=key, headers=headers, message_id=message_id, partition=partition)
        return self.process()[-1]

    def produce(
        self,
        topic: str,
        value: bytes | str | Any,
        *,
        key: bytes | str | None = None,
        headers: HeadersArg = None,
        message_id: str | None = None,
        partition: int = 0,
    ) -> Origin:
        """Append a record to ``topic`` without processing it (see :meth:`send`); return where it is.

        :meth:`process` then hands every record produced so far to the
        handlers in one poll: a batch handler gets them in one call (up to its
        ``batch_size``).
        """
        self.engine  # noqa: B018 - refuses use outside the with block
        if topic not in self.app.handlers:
            raise ConfigurationError(f"no handler for topic {topic!r}; the App handles {sorted(self.app.handlers)}")
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise ConfigurationError("partition must be a non-negative integer")
        raw_value = None if value is None else encode_value(value)
        raw_key = key.encode("utf-8") if isinstance(key, str) else key
        if raw_key is not None and not isinstance(raw_key, bytes):
            raise ConfigurationError(f"key must be bytes, text or None, got {type(key).__name__}")
        record_headers = _headers(headers)
        if message_id is not None or self._signing_key is not None:
            if message_id is None:
                found = [data for name, data in record_headers if name == ids.DEFAULT_HEADER]
                message_id = found[-1].decode("utf-8") if found else new_message_id()
            # As exactlyonce.Producer stamps a record (producer.stamp_headers), a null value included.
            ours = {ids.DEFAULT_HEADER}
            if self._signing_key is not None:
                ours |= {signing.KEY_ID_HEADER, signing.SIGNATURE_HEADER}
            record_headers = [(name, data) for name, data in record_headers if name not in ours]
            record_headers.append((ids.DEFAULT_HEADER, message_id.encode("utf-8")))
            if self._signing_key is not None:
                record_headers += signing.sign(message_id, raw_key, raw_value, self._signing_key)
        for p in range(len(self.cluster.partitions(topic)), partition + 1):
            self.cluster.log.setdefault(TopicPartition(topic, p), [])
        record = self.cluster.append(topic, partition, key=raw_key, value=raw_value, headers=record_headers)
        self._pending.append(record)
        return Origin(record.topic, record.partition, record.offset)

    def process(self) -> list[Outcome]:
        """Run the handlers until every record produced is read and decided; return the new records' outcomes.

        One run of a real :class:`~exactlyonce.runtime.Runner` (a worker
        that joins the App's group, polls from the committed offsets, and
        commits and leaves when all is read), in this thread. A record's
        outcome is the first one booked for it in the run: ``parked`` for a
        sequenced record ahead of its turn, even if a later record of the
        same run released it (:attr:`decisions` has both). Exceptions that
        stop a worker (a handler returning a coroutine, say) are raised here.
        """
        pending, self._pending = self._pending, []
        booked: list[Decision] = []

        def observe(handler: Handler, entry: Entry) -> None:
            decision = _decision(entry)
            booked.append(decision)
            self.decisions.append(decision)

        stop = FastStop()
        rewinds = 0
        decided = 0

        def before_poll(member: TwinConsumer) -> bool:
            nonlocal rewinds, decided
            fake = member.fake
            if fake.generation is None:
                return False  # this poll joins the group
            read = all(position >= self.cluster.end_offset(tp) for tp, position in fake.positions.items())
            if read and not runner.more_work:
                stop.set()
                return True
            if not read and len(booked) == decided:
                # Records left to read, none decided since the last poll: the runtime rewound them.
                rewinds += 1
            decided = len(booked)
            if rewinds > MAX_REWINDS:
                stop.set()
                return True
            return False

        runner = Runner(
            self._settings(), stop, poll_timeout_s=0.01, observer=observe,
            consumer_factory=self.cluster.consumer_factory(), producer_factory=self.cluster.producer_factory(),
        )
        self.cluster.before_poll = before_poll
        try:
            runner.run()
        finally:
            self.cluster.before_poll = None
        outcomes: list[Outcome] = []
        first_outcome: dict[Origin, Outcome] = {}
        for decision in booked:
            if decision.outcome in _DECIDING:
                first_outcome.setdefault(decision.origin, decision.outcome)
        for record in pending:
            where = Origin(record.topic, record.partition, record.offset)
            outcome = first_outcome.get(where)
            if outcome is None:
                raise TransientError(
                    f"{where} was not decided: the runtime rewound it {rewinds} time(s) after transient failures "
                    "(see the log; is a session of the test holding a lock?)"
                )
            outcomes.append(outcome)
        self.outcomes.extend(outcomes)
        return outcomes

    @property
    def published(self) -> list[PublishedRecord]:
        """Every record stored in the outbox since the TestApp started, in the order the relay sends them.

        Read from the ``exactlyonce_outbox`` table (committed rows only: a
        rolled-back handler published nothing), with the headers the relay
        stamps, signed with the App's ``signing_key`` if it has one. Feed them
        to another TestApp to test the next service:
        ``other.send(p.topic, p.value, key=p.key, headers=p.headers)``.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox.c.topic, outbox.c.key, outbox.c.value, outbox.c.headers, outbox.c.message_id)
                .where(outbox.c.id > self._outbox_start).order_by(outbox.c.id)
            ).all()
        key = self.app.signing_key
        return [
            PublishedRecord(
                topic=row.topic, key=row.key, value=row.value, message_id=row.message_id,
                headers=stamp_headers(row.message_id, row.key, row.value, headers_from_json(row.headers), key),
            )
            for row in rows
        ]

    # -- internals --------------------------------------------------------------

    def _settings(self) -> _WorkerSettings:
        app = self.app
        return _WorkerSettings(
            group_id=app.group_id,
            consumer_config=dict(app.consumer_config),
            producer_config=dict(app.producer_config),
            transient_retry_budget=timedelta(0),
            batch_wait=timedelta(0),
            signing_keys=app.signing_keys,
            metrics=self.metrics,
            stats=self.stats,
            handlers=app.handlers,
            bootstrap_servers="exactlyonce-testapp:9092",
            engine=self.engine,
            url=self.engine.url.render_as_string(hide_password=False),
            lock_timeout=app.lock_timeout,
            batch_lock_timeout=app.batch_lock_timeout,
        )

    def _appended(self, record: TwinRecord) -> None:
        if record.topic in self._dead_letter_topics:
            original, meta = deadletter.split_headers(record.headers)
            self.dead_letters.append(DeadLetterRecord(record.topic, record.key, record.value, original, meta))


def _headers(headers: HeadersArg) -> list[tuple[str, bytes]]:
    pairs: Iterable[tuple[str, bytes | str]]
    if headers is None:
        return []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found: list[tuple[str, bytes]] = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ConfigurationError(f"headers must be (name, value) pairs, got {pair!r}")
        name, data = pair
        if not isinstance(name, str):
            raise ConfigurationError(f"a header name must be text, got {name!r}")
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, bytes):
            raise ConfigurationError(f"header {name!r}: its value must be bytes or text, got {type(data).__name__}")
        found.append((name, data))
    return found


def _decision(entry: Entry) -> Decision:
    message = entry.message
    dead = entry.outcome is Outcome.DEAD_LETTERED and entry.error is not None
    stream = entry.fields.get("stream")
    number = entry.fields.get("number")
    return Decision(
        origin=Origin(message.topic, message.partition, message.offset),
        key=message.key,
        value=message.value,
        message_id=entry.message_id,
        outcome=entry.outcome,
        reason=reason_of(entry.error) if dead and entry.error is not None else None,
        error=entry.error if dead else None,
        stream=stream if isinstance(stream, str) else None,
        number=number if isinstance(number, int) else None,
    )


# -- end-to-end tests -------------------------------------------------------------

T = TypeVar("T")


class Worker:
    """``app.run()`` in a background thread, for end-to-end tests against a real broker and database.

    ``with Worker(app) as worker:`` starts it; leaving the block stops it
    (the message in hand is finished, offsets committed, the group left, the
    outbox relay stopped) and raises what ``run()`` raised, if anything. The
    App runs as configured: give it its broker and database (arguments, or
    ``EXACTLYONCE_BOOTSTRAP_SERVERS`` / ``EXACTLYONCE_DATABASE_URL``, read
    when first needed: an App creates its engine once, so an App reused by
    several tests keeps the first test's database).
    """

    def __init__(self, app: App, *, stop_timeout: timedelta = timedelta(seconds=60)) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(f"Worker needs an exactlyonce.App, got {type(app).__name__}")
        self.app = app
        self._stop_timeout = stop_timeout
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"exactlyonce-worker-{app.group_id}", daemon=True)

    def start(self) -> Worker:
        """Start ``app.run()`` in its thread; return the worker."""
        if self._thread.ident is not None:
            raise ConfigurationError("a Worker can be started once")
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.app.run(install_signal_handlers=False)
        except BaseException as exc:
            self._error = exc

    @property
    def running(self) -> bool:
        """Whether ``run()`` is still running."""
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What ``run()`` raised, once it has returned (``None``: nothing, or still running)."""
        return self._error

    def wait_for(
        self,
        condition: Callable[[], T],
        *,
        timeout: timedelta = timedelta(seconds=60),
        interval: timedelta = timedelta(milliseconds=100),
    ) -> T:
        """Call ``condition()`` until it returns something true, and return that.

        Raises :class:`AssertionError` when ``timeout`` passes first (with the
        last value), and at once, with the cause, when the worker stopped.
        """
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            result = condition()
            if result:
                return result
            if not self.running:
                raise AssertionError(f"the worker stopped (error: {self._error!r}); last value: {result!r}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"not within {timeout.total_seconds():g}s; last value: {result!r}")
            time.sleep(interval.total_seconds())

    def stop(self) -> None:
        """Stop ``run()`` and wait for it; raise what it raised, or an error if it did not stop in time."""
        deadline = time.monotonic() + self._stop_timeout.total_seconds()
        # Asked again until the thread ends: run() clears a stop that came before it started.
        while self._thread.is_alive() and time.monotonic() < deadline:
            self.app.stop()
            self._thread.join(0.1)
        if self._thread.is_alive():
            raise RuntimeError(f"the worker of group {self.app.group_id!r} did not stop within "
                               f"{self._stop_timeout.total_seconds():g}s")
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop()
        except Exception as stop_error:  # the test's own failure matters more; keep this one as a note
            exc.add_note(f"and stopping the worker failed: {stop_error!r}")


def docker_available(timeout: timedelta = timedelta(seconds=3)) -> bool:
    """Whether a Docker engine answers a ping (with the ``docker`` package testcontainers installs)."""
    try:
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=max(int(timeout.total_seconds()), 1))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def fresh_database(server_url: str, *, prefix: str = "exactlyonce_test") -> Iterator[str]:
    """A new, empty database on the PostgreSQL or MySQL/MariaDB server of ``server_url``; dropped on exit.

    Yields its URL (``server_url`` with the new database's name). The user
    of ``server_url`` needs the right to create databases. Dispose of the
    engines you made on it before leaving the block: on PostgreSQL the
    database is dropped ``WITH (FORCE)``, which ends their connections.
    """
    url = _db.normalize_url(server_url)
    backend = url.get_backend_name()
    if backend not in ("postgresql", "mysql", "mariadb"):
        raise ConfigurationError(f"fresh_database needs a PostgreSQL or MySQL/MariaDB URL, got {backend!r}")
    name = f"{prefix}_{secrets.token_hex(6)}"
    if not name.replace("_", "").isalnum():
        raise ConfigurationError("prefix must hold letters, digits and underscores only")
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                if backend == "postgresql" and (conn.dialect.server_version_info or (0,)) >= (13,):
                    conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                else:
                    conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        admin.dispose()
