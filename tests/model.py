"""A model-based test of the runtime: a Hypothesis state machine drives real Runners over the twins.

Each example is one consumer group on two topics of two partitions each:
``orders``, whose handler (``ids.json_field("id")``, batch size, poll size
and batch wait drawn per example) writes one row per effect into
``model_effects`` (no unique constraint: a double shows), and ``ledger``,
whose ``sequence=`` handler does the same per ``(stream, number)``; a real
database (SQLite here, PostgreSQL and MariaDB in
``tests/integration/test_model_databases.py``) and the twins of
:mod:`exactlyonce.testing` for the broker.

Rules send records (fresh IDs, exact duplicates onto either partition,
re-sends of an ID with another payload, IDs that differ only by case or a
trailing space, bad IDs: missing, empty, NUL, a lone surrogate, a leading
``@``, 256 characters, a value that is not JSON; handlers that always fail or
fail their first one or two calls; sequenced records out of order, with gaps
and repeats, and bad sequences), arm faults (a crash in the handler, i.e.
before the database commit; a crash right before or right after the offset
commit; a refused offset commit; a zombie: another worker takes over and
commits while one is committing; a cut poll; a deadlock-like transient
database error for the next one or two handler calls; a dead-letter publish
refused as retriable, appended with its acknowledgement lost, or
a crash before or after it; a rebalance at the next poll, which may land in a
batch being filled and hand back only one partition), and run a worker for a few
polls (a new Runner each time: a restart from the committed offsets; a
crash abandons it and its consumer, as a dead process would). ``drain`` (and
the teardown) switches the faults off and runs a worker until the log is
consumed.

Checked after every step: no effect twice; each stream handled 1, 2, ... in
order; no offset committed past a record whose decision is not in the
database (its dedup row, its coordinates row for a dead letter under
coordinates, its stream's watermark or parked row); committed offsets never
move backwards; each dead letter comes from a record that may be
dead-lettered, with the right reason; no record has two dead letters whose
transactions committed (copies published in a transaction that then rolled
back, "phantoms", are told apart through the engine's commit and rollback
events, and left out of the final accounting: the publish is inside the
transaction). After a drain: every partition committed to its end; each
valid ID's effect exactly once, or its one dead letter (``handler-error``)
when its payload fails; every other payload under that ID dead-lettered as
``fingerprint-mismatch``; every bad record dead-lettered once with its
reason; each stream handled up to its first gap.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import kafka.errors
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from exactlyonce import App, Retry, ids
from exactlyonce.runtime import Runner, loop, ordered
from exactlyonce.schema import counters, parked, processed, sequence_streams
from exactlyonce.testing import (
    CRASH_AFTER,
    CRASH_BEFORE,
    LOST_ACK,
    REFUSE,
    Cluster,
    Crash,
    FastStop,
    TopicPartition,
    TwinConsumer,
    TwinRecord,
    VirtualTime,
)

TOPIC = "orders"
DLQ = f"{TOPIC}.dlq"
#: The sequenced handler's topic: ``{"s": stream, "n": number}`` records.
LEDGER = "ledger"
LEDGER_DLQ = f"{LEDGER}.dlq"
STREAMS = ["a", "b"]
PARTITIONS = 2
GROUP = "model"
SCOPE = f"{GROUP}:{TOPIC}"
LEDGER_SCOPE = f"{GROUP}:{LEDGER}"

effects_metadata = sa.MetaData()
#: One row per effect; ``message_id`` is deliberately not unique.
model_effects = sa.Table(
    "model_effects",
    effects_metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
)

#: Payload behaviours: the handler applies, always fails, or fails its first N calls.
BEHAVIOURS = ["ok", "ok", "ok", "always", "first1", "first2"]

#: Bad records: (JSON value or raw bytes, expected dead-letter reason).
BAD_VALUES: dict[str, tuple[bytes, str]] = {
    "no-id": (b'{"v": 1}', "invalid-message-id"),
    "empty": (b'{"id": ""}', "invalid-message-id"),
    "nul": (b'{"id": "a\\u0000b"}', "invalid-message-id"),
    "surrogate": (b'{"id": "x\\ud800"}', "invalid-message-id"),
    "reserved": (b'{"id": "@orders/0/0"}', "invalid-message-id"),
    "too-long": (json.dumps({"id": "x" * 256}).encode(), "invalid-message-id"),
    "float": (b'{"id": 1.5}', "invalid-message-id"),
    "not-json": (b"\xff not json", "undecodable-value"),
}

COMMIT_FAULTS = [CRASH_BEFORE, CRASH_AFTER, REFUSE]
PUBLISH_FAULTS: list[Any] = [
    kafka.errors.KafkaTimeoutError,  # retriable
    # A permanent refusal (TopicAuthorizationFailedError, ...) stops the worker
    # with a ConfigurationError by design: tests/integration/test_dead_letter_refusals.py.
    LOST_ACK,  # appended, but the acknowledgement never came
    CRASH_BEFORE,
    CRASH_AFTER,
]


def model_settings() -> settings:
    """A fixed, modest budget (derandomized under CI); ``MODEL_EXAMPLES`` / ``MODEL_STEPS`` for longer runs."""
    examples = int(os.environ.get("MODEL_EXAMPLES", "25"))
    steps = int(os.environ.get("MODEL_STEPS", "30"))
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=os.environ.get("CI") == "true" and "MODEL_EXAMPLES" not in os.environ,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        # No "explain" phase: tracing every line while shrinking a failure took minutes.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        print_blob=True,
    )


def transient_error(dialect: str) -> sa.exc.OperationalError:
    """A deadlock as the dialect's driver reports it (what ``exactlyonce._db`` classifies as transient)."""
    orig: Exception
    if dialect == "sqlite":
        orig = sqlite3.OperationalError("database is locked")
    elif dialect in ("mysql", "mariadb"):
        import pymysql.err

        orig = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")
    else:
        import psycopg.errors

        orig = psycopg.errors.DeadlockDetected("deadlock detected")
    return sa.exc.OperationalError("UPDATE model (injected)", {}, orig)


@dataclass(frozen=True)
class Sent:
    """A record the model sent: its coordinates, value, and what it should become."""

    partition: int
    offset: int
    value: bytes
    #: The valid message ID (``orders``), or None for a bad or a sequenced record.
    message_id: str | None
    #: For a bad record: the dead-letter reason expected.
    bad_reason: str | None = None
    topic: str = TOPIC
    #: A good ``ledger`` record's stream and number.
    stream: str | None = None
    number: int | None = None

    @property
    def coordinates(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    @property
    def behaviour(self) -> str:
        return str(json.loads(self.value).get("b", "ok")) if self.message_id is not None else "-"


class RuntimeModel(RuleBasedStateMachine):
    """Drives Runners over the twins against ``database_url`` (set by the test that runs it)."""

    #: Set by the test: a database upgraded to head with ``model_effects`` created.
    database_url: str = ""
    #: ``sync``: ``def`` handlers; ``async``: ``async def`` handlers, each Runner on its own
    #: event loop, the handlers' transactions on the App's async engine.
    handler_kind: str = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.cluster = Cluster()
        self.cluster.create_topic(TOPIC, PARTITIONS)
        self.cluster.create_topic(LEDGER, PARTITIONS)
        #: Numbers sent per stream of the sequenced handler.
        self.numbers: dict[str, set[int]] = {stream: set() for stream in STREAMS}
        #: Numbers held back to open a gap, sent by the stream's next ``send_sequenced``.
        self.withheld: dict[str, list[int]] = {}
        self.sent: list[Sent] = []
        self.payloads: dict[str, list[bytes]] = {}
        self.next_id = 0
        self.calls: Counter[bytes] = Counter()
        self.handler_faults: list[str] = []
        #: Dead letters (topic, offset) sent inside a transaction that has not committed yet.
        self.unsettled: list[tuple[str, int]] = []
        #: Dead letters whose transaction rolled back after the publish: copies the broker has,
        #: which the database does not record (a redelivery sends the record's dead letter again,
        #: or finds it a duplicate of another copy that won).
        self.phantoms: set[tuple[str, int]] = set()
        self.runs = 0
        #: (first member, first producer) of each worker running, innermost last.
        self.running: list[tuple[int, int]] = []
        self.app: App | None = None

    # -- set-up -------------------------------------------------------------

    @initialize(batch_size=st.sampled_from([1, 2, 3, 100]), max_poll=st.sampled_from([1, 2, 5, 500]),
                batch_wait=st.sampled_from([0, 0, 1]))
    def start(self, batch_size: int, max_poll: int, batch_wait: int) -> None:
        app = App(
            GROUP,
            bootstrap_servers="twin:9092",
            database_url=self.database_url,
            consumer_config={"max_poll_records": max_poll},
            transient_retry_budget=timedelta(0),
            # With a batch wait the runner polls again to fill a batch (on the twin's clock), so a
            # rebalance can land in the middle of one.
            batch_wait=timedelta(seconds=batch_wait),
            outbox=False,
        )

        retry = Retry(attempts=3, backoff=timedelta(0), max_backoff=timedelta(0))
        if self.handler_kind == "sync":
            @app.handler(TOPIC, message_id=ids.json_field("id"), batch_size=batch_size, retry=retry)
            def handle(message: Any, session: Any) -> None:
                self._handle(message, session)

            @app.handler(LEDGER, sequence=lambda m: (m.json()["s"], m.json()["n"]), batch_size=batch_size,
                         retry=retry)
            def handle_in_order(message: Any, session: Any) -> None:
                self._handle(message, session)
        else:
            @app.handler(TOPIC, message_id=ids.json_field("id"), batch_size=batch_size, retry=retry)
            async def handle_async(message: Any, session: Any) -> None:
                await self._handle_async(message, session)

            @app.handler(LEDGER, sequence=lambda m: (m.json()["s"], m.json()["n"]), batch_size=batch_size,
                         retry=retry)
            async def handle_in_order_async(message: Any, session: Any) -> None:
                await self._handle_async(message, session)

        self.app = app
        # The engine the handlers' transactions (and their dead letters) run on.
        self.decisions = app.engine if self.handler_kind == "sync" else app.async_engine.sync_engine
        self.dialect = app.engine.dialect.name
        with app.engine.begin() as conn:
            for table in (model_effects, processed, counters, parked, sequence_streams):
                conn.execute(sa.delete(table))
        sa.event.listen(self.decisions, "commit", self._on_db_commit)
        sa.event.listen(self.decisions, "rollback", self._on_db_rollback)
        self.cluster.on_append = self._on_append

    def teardown(self) -> None:
        if self.app is None:
            return
        try:
            self.drain()
        finally:
            for name, listener in (("commit", self._on_db_commit), ("rollback", self._on_db_rollback)):
                if sa.event.contains(self.decisions, name, listener):
                    sa.event.remove(self.decisions, name, listener)
            self.app.engine.dispose()  # (the async engine's pool is disposed of by each Runner, on its loop)

    # -- the handler --------------------------------------------------------

    def _handle(self, message: Any, session: Any) -> None:
        if self.handler_faults:
            fault = self.handler_faults.pop(0)
            if fault == "crash":
                self._crash()
                raise Crash("crashed in the handler, before the database commit")
            raise transient_error(self.dialect)
        body = message.json()
        if message.topic == LEDGER:
            session.execute(sa.insert(model_effects).values(message_id=f"{body['s']}#{body['n']}",
                                                            payload=message.value.decode()))
            return
        self.calls[message.value] += 1
        behaviour = body.get("b", "ok")
        if behaviour == "always" or (
            behaviour.startswith("first") and self.calls[message.value] <= int(behaviour[5:])
        ):
            raise ValueError(f"handler failure ({behaviour}, call {self.calls[message.value]})")
        session.execute(sa.insert(model_effects).values(message_id=body["id"], payload=message.value.decode()))

    async def _handle_async(self, message: Any, session: Any) -> None:
        """:meth:`_handle` as an ``async def`` handler: the same faults and effects, through its AsyncSession."""
        await asyncio.sleep(0)
        if self.handler_faults:
            fault = self.handler_faults.pop(0)
            if fault == "crash":
                self._crash()
                raise Crash("crashed in the handler, before the database commit")
            raise transient_error(self.dialect)
        body = message.json()
        if message.topic == LEDGER:
            await session.execute(sa.insert(model_effects).values(message_id=f"{body['s']}#{body['n']}",
                                                                  payload=message.value.decode()))
            return
        self.calls[message.value] += 1
        behaviour = body.get("b", "ok")
        if behaviour == "always" or (
            behaviour.startswith("first") and self.calls[message.value] <= int(behaviour[5:])
        ):
            raise ValueError(f"handler failure ({behaviour}, call {self.calls[message.value]})")
        await session.execute(sa.insert(model_effects).values(message_id=body["id"],
                                                              payload=message.value.decode()))

    def _crash(self) -> None:
        """The process dies: the innermost worker's consumer and producers answer nothing any more."""
        members, producers = self.running[-1]
        for member in self.cluster.members[members:]:
            member.fake.dead = True
        for producer in self.cluster.producers[producers:]:
            producer.dead = True

    # -- dead letters inside transactions -----------------------------------

    def _on_append(self, record: TwinRecord) -> None:
        if record.topic in (DLQ, LEDGER_DLQ):
            self.unsettled.append((record.topic, record.offset))

    def _on_db_commit(self, conn: Any) -> None:
        self.unsettled.clear()

    def _on_db_rollback(self, conn: Any) -> None:
        self.phantoms.update(self.unsettled)
        self.unsettled.clear()

    # -- sending ------------------------------------------------------------

    def _send(self, partition: int, value: bytes, message_id: str | None, bad_reason: str | None = None,
              topic: str = TOPIC, stream: str | None = None, number: int | None = None) -> None:
        record = self.cluster.append(topic, partition, key=b"k", value=value)
        self.sent.append(Sent(partition, record.offset, value, message_id, bad_reason, topic, stream, number))
        if message_id is not None and value not in self.payloads.setdefault(message_id, []):
            self.payloads[message_id].append(value)

    @rule(batch=st.lists(st.tuples(st.integers(0, PARTITIONS - 1), st.sampled_from(BEHAVIOURS),
                                   st.sampled_from(["", "", "é", "😀"])), min_size=1, max_size=6))
    def send_new(self, batch: list[tuple[int, str, str]]) -> None:
        for partition, behaviour, suffix in batch:
            self._send_new(partition, behaviour, suffix)

    def _send_new(self, partition: int, behaviour: str, suffix: str) -> None:
        self.next_id += 1
        message_id = f"m{self.next_id}{suffix}"
        self._send(partition, json.dumps({"id": message_id, "b": behaviour}).encode(), message_id)

    @precondition(lambda self: bool(self.payloads))
    @rule(data=st.data(), copies=st.integers(1, 4))
    def send_duplicates(self, data: st.DataObject, copies: int) -> None:
        for _ in range(copies):
            message_id = data.draw(st.sampled_from(sorted(self.payloads)))
            value = data.draw(st.sampled_from(self.payloads[message_id]))
            self._send(data.draw(st.integers(0, PARTITIONS - 1)), value, message_id)

    @precondition(lambda self: bool(self.payloads))
    @rule(data=st.data(), partition=st.integers(0, PARTITIONS - 1))
    def send_other_payload(self, data: st.DataObject, partition: int) -> None:
        message_id = data.draw(st.sampled_from(sorted(self.payloads)))
        variant = len(self.payloads[message_id])
        self._send(partition, json.dumps({"id": message_id, "b": "ok", "v": variant}).encode(), message_id)

    @precondition(lambda self: bool(self.payloads))
    @rule(data=st.data(), partition=st.integers(0, PARTITIONS - 1), how=st.sampled_from(["upper", "space"]))
    def send_lookalike(self, data: st.DataObject, partition: int, how: str) -> None:
        """An ID that differs from a known one only by case or a trailing space: another message."""
        base = data.draw(st.sampled_from(sorted(self.payloads)))
        message_id = base.upper() if how == "upper" else base + " "
        if len(message_id) > 255:
            return
        self._send(partition, json.dumps({"id": message_id, "b": "ok"}).encode(), message_id)

    @rule(partition=st.integers(0, PARTITIONS - 1), kind=st.sampled_from(sorted(BAD_VALUES)))
    def send_bad(self, partition: int, kind: str) -> None:
        value, reason = BAD_VALUES[kind]
        self._send(partition, value, None, reason)

    @rule(data=st.data(), stream=st.sampled_from(STREAMS), count=st.integers(1, 5),
          withhold=st.booleans(), repeats=st.integers(0, 2))
    def send_sequenced(self, data: st.DataObject, stream: str, count: int, withhold: bool, repeats: int) -> None:
        """The stream's next numbers shuffled over both partitions, one maybe withheld (a gap, sent by a
        later call), with repeats of numbers already sent."""
        numbers = self.withheld.pop(stream, [])
        first = max(self.numbers[stream] | set(numbers) | {0}) + 1
        block = data.draw(st.permutations(range(first, first + count)))
        if withhold:
            self.withheld[stream] = [block[0]]
            block = block[1:]
        numbers += block
        for _ in range(repeats):
            if self.numbers[stream] or numbers:
                numbers.append(data.draw(st.sampled_from(sorted(self.numbers[stream] | set(numbers)))))
        for number in numbers:
            self._send(data.draw(st.integers(0, PARTITIONS - 1)), json.dumps({"s": stream, "n": number}).encode(),
                       None, topic=LEDGER, stream=stream, number=number)
            self.numbers[stream].add(number)

    @rule(partition=st.integers(0, PARTITIONS - 1),
          value=st.sampled_from([b'{"s": "a", "n": 0}', b'{"s": "", "n": 1}', b'{"n": 1}', b'{"s": "a", "n": "1"}']))
    def send_bad_sequence(self, partition: int, value: bytes) -> None:
        self._send(partition, value, None, "bad-sequence", topic=LEDGER)

    # -- faults -------------------------------------------------------------

    @rule(fault=st.sampled_from(["crash", "transient", "transient2"]))
    def arm_handler_fault(self, fault: str) -> None:
        self.handler_faults += ["transient", "transient"] if fault == "transient2" else [fault]

    @rule(fault=st.sampled_from([*COMMIT_FAULTS, "zombie"]))
    def arm_commit_fault(self, fault: str) -> None:
        self.cluster.commit_faults.append(self._take_over if fault == "zombie" else fault)

    @rule()
    def arm_poll_fault(self) -> None:
        self.cluster.poll_faults.append(True)

    @rule(fault=st.sampled_from(PUBLISH_FAULTS))
    def arm_publish_fault(self, fault: Any) -> None:
        self.cluster.publish_faults.append(fault)

    @rule(keep=st.sampled_from(["all", "all", "p0", "p1"]))
    def arm_rebalance(self, keep: str) -> None:
        """A rebalance at the next poll; the member may get back only one partition (until the next join)."""
        self.cluster.rebalance_pending = True
        if keep != "all":
            self.cluster.assign_only = {TopicPartition(t, int(keep[1])) for t in (TOPIC, LEDGER)}

    # -- running ------------------------------------------------------------

    def _run_worker(self, max_polls: int, arrivals: list[tuple[int, str, str]] | None = None) -> str:
        """Run a new Runner until it has polled ``max_polls`` times or read everything; return how it ended.

        ``arrivals``: fresh records sent while it runs, one before each poll after the first.
        """
        assert self.app is not None
        stop = FastStop()
        polls = 0
        arriving = list(arrivals or [])

        idle_polls = 0
        runner: Runner | None = None

        def before_poll(member: TwinConsumer) -> bool:
            nonlocal polls, idle_polls
            polls += 1
            if polls > 1 and arriving:
                self._send_new(*arriving.pop(0))
            fake = member.fake
            idle = fake.generation is not None and not fake.stale and not self.cluster.rebalance_pending and all(
                fake.positions.get(tp, 0) >= self.cluster.end_offset(tp) for tp in fake.assigned
            )
            # A runner with sequence work left (a release cut short at batch_size) is not idle.
            busy = runner is not None and runner._ordered.more_work
            idle_polls = idle_polls + 1 if idle and not arriving and not busy else 0
            # Stop at the second idle poll in a row: the first may be one that fills a batch
            # (batch_wait), whose records are handled after it.
            if polls > max_polls or idle_polls >= 2:
                stop.set()
                return True
            return False

        outer_hook = self.cluster.before_poll
        self.cluster.before_poll = before_poll
        self.runs += 1
        self.running.append((len(self.cluster.members), len(self.cluster.producers)))
        runner = Runner(self.app, stop, poll_timeout_s=0.5,
                        consumer_factory=self.cluster.consumer_factory(),
                        producer_factory=self.cluster.producer_factory())
        clock = loop.time
        loop.time = ordered.time = VirtualTime(self.cluster)  # type: ignore[assignment]
        try:
            runner.run()
        except Crash:
            return "crashed"
        finally:
            loop.time = ordered.time = clock
            self.cluster.before_poll = outer_hook
            self.running.pop()
        return "stopped"

    def _take_over(self) -> None:
        """Armed as a commit fault: the committing worker was evicted (a zombie); another
        worker joins, handles what is not committed yet and commits; then the zombie's commit goes on."""
        if len(self.running) < 2:
            event(f"zombie: the other worker {self._run_worker(max_polls=3)}")

    @rule(max_polls=st.integers(1, 8), arrivals=st.lists(
        st.tuples(st.integers(0, PARTITIONS - 1), st.sampled_from(BEHAVIOURS), st.just("")), max_size=4))
    def run_worker(self, max_polls: int, arrivals: list[tuple[int, str, str]]) -> None:
        event(f"worker {self._run_worker(max_polls, arrivals)}")

    @rule()
    def drain(self) -> None:
        """Faults off; run until everything is read; then the final checks."""
        self.handler_faults.clear()
        self.cluster.commit_faults.clear()
        self.cluster.poll_faults.clear()
        self.cluster.publish_faults.clear()
        self.cluster.rebalance_pending = False
        self.cluster.assign_only = None
        ended = self._run_worker(max_polls=10 + 2 * len(self.sent))
        assert ended == "stopped", ended
        for tp in self.cluster.partitions(TOPIC) + self.cluster.partitions(LEDGER):
            committed, end = self.cluster.committed_offset(GROUP, tp), self.cluster.end_offset(tp)
            assert committed == end, f"{tp} stuck: committed {committed}, end {end}"
        self._check_outcomes()
        dead = Counter(reason for _, reason in self._dead_letters())
        event(f"drained: {len(self.sent)} records, dead letters: {sorted(dead)}")
        event(f"drained: {len(self.phantoms)} dead letters of rolled-back transactions")

    # -- what the database and the dead-letter topic say ---------------------

    def _effects(self) -> list[tuple[str, str]]:
        assert self.app is not None
        with self.app.engine.connect() as conn:
            return [(m, p) for m, p in conn.execute(sa.select(model_effects.c.message_id, model_effects.c.payload))]

    def _streams(self) -> tuple[dict[str, int], set[tuple[str, int]]]:
        """The sequenced scope's watermarks, and its parked (stream, number)s."""
        assert self.app is not None
        with self.app.engine.connect() as conn:
            watermarks = conn.execute(sa.select(sequence_streams.c.stream, sequence_streams.c.watermark)
                                      .where(sequence_streams.c.scope == LEDGER_SCOPE))
            numbers = conn.execute(sa.select(parked.c.stream, parked.c.number).where(parked.c.scope == LEDGER_SCOPE))
            return {s: int(w) for s, w in watermarks}, {(s, int(n)) for s, n in numbers}

    def _dedup_rows(self, scope: str = SCOPE) -> dict[str, str]:
        assert self.app is not None
        with self.app.engine.connect() as conn:
            rows = conn.execute(sa.select(processed.c.message_id, processed.c.fingerprint)
                                .where(processed.c.scope == scope))
            return {message_id: fingerprint for message_id, fingerprint in rows}

    def _dead_letters(self, *, settled_only: bool = False) -> list[tuple[tuple[str, int, int], str]]:
        """(source coordinates, reason) of every dead letter; ``settled_only``: of those whose transaction
        committed (not the phantoms)."""
        return [(_source(record), (record.header("x-exactlyonce-reason") or b"").decode())
                for topic in (DLQ, LEDGER_DLQ) for record in self.cluster.records(topic)
                if not (settled_only and (topic, record.offset) in self.phantoms)]

    # -- invariants (after every step) ----------------------------------------

    @invariant()
    def no_effect_twice(self) -> None:
        if self.app is None:
            return
        doubled = {m: n for m, n in Counter(m for m, _ in self._effects()).items() if n > 1}
        assert not doubled, f"effects applied more than once: {doubled}"

    @invariant()
    def committed_offsets_cover_only_decided_records(self) -> None:
        if self.app is None:
            return
        rows = self._dedup_rows()
        ledger_rows = self._dedup_rows(LEDGER_SCOPE)
        watermarks, parked_numbers = self._streams()
        for record in self.sent:
            committed = self.cluster.committed_offset(GROUP, TopicPartition(record.topic, record.partition))
            if record.offset >= committed:
                continue
            coordinates = f"@{record.topic}/{record.partition}/{record.offset}"
            if record.topic == LEDGER:
                if record.bad_reason is not None:
                    assert coordinates in ledger_rows, f"offset committed past {record}, dead letter not recorded"
                else:
                    assert record.stream is not None and record.number is not None
                    assert (record.number <= watermarks.get(record.stream, 0)
                            or (record.stream, record.number) in parked_numbers), (
                        f"offset committed past {record}, neither handled nor parked"
                    )
                continue
            if record.message_id is None:
                assert coordinates in rows, f"offset committed past {record}, dead letter not recorded"
                continue
            assert record.message_id in rows, f"offset committed past {record}, which is not in the database"
            if rows[record.message_id] != _sha256(record.value):
                assert coordinates in rows, f"offset committed past {record} (another payload), not recorded"

    @invariant()
    def each_stream_in_order_once(self) -> None:
        if self.app is None:
            return
        for stream in STREAMS:
            numbers = self._stream_effects(stream)
            assert numbers == list(range(1, len(numbers) + 1)), f"stream {stream!r} handled as {numbers}"

    def _stream_effects(self, stream: str) -> list[int]:
        assert self.app is not None
        with self.app.engine.connect() as conn:
            rows = conn.execute(sa.select(model_effects.c.message_id).order_by(model_effects.c.seq)).scalars()
            return [int(m.split("#")[1]) for m in rows if m.startswith(f"{stream}#")]

    @invariant()
    def committed_offsets_never_move_backwards(self) -> None:
        last: dict[TopicPartition, int] = {}
        for _, tp, offset in self.cluster.commit_history:
            assert offset >= last.get(tp, 0), f"{tp}: committed offset moved back from {last[tp]} to {offset}"
            last[tp] = offset

    @invariant()
    def dead_letters_are_right_and_single(self) -> None:
        by_coordinates = {record.coordinates: record for record in self.sent}
        copies = Counter(source for source, _ in self._dead_letters(settled_only=True))
        for source, reason in self._dead_letters():
            record = by_coordinates.get(source)
            assert record is not None, f"a dead letter from {source}, which was never sent"
            assert record.topic == TOPIC or record.bad_reason is not None, f"{record} dead-lettered as {reason}"
            if record.bad_reason is not None:
                assert reason == record.bad_reason, f"{record}: dead-lettered as {reason}"
            else:
                assert reason in ("handler-error", "fingerprint-mismatch"), f"{record}: dead-lettered as {reason}"
                if reason == "handler-error":
                    assert record.behaviour != "ok", f"{record} never fails, yet dead-lettered as {reason}"
            assert copies[source] <= 1, f"{record} dead-lettered {copies[source]} times (each committed)"

    # -- after a drain ------------------------------------------------------

    def _check_outcomes(self) -> None:
        effects = self._effects()
        dead = self._dead_letters(settled_only=True)
        dead_sources = {source for source, _ in dead}
        reasons = dict(dead)
        effect_payloads: dict[str, list[str]] = {}
        for message_id, payload in effects:
            effect_payloads.setdefault(message_id, []).append(payload)
        for stream in STREAMS:
            prefix = 0
            while prefix + 1 in self.numbers[stream]:
                prefix += 1
            assert self._stream_effects(stream) == list(range(1, prefix + 1)), (
                f"stream {stream!r}: handled {self._stream_effects(stream)}, sent {sorted(self.numbers[stream])}"
            )
            effect_payloads = {m: p for m, p in effect_payloads.items() if not m.startswith(f"{stream}#")}
        assert set(effect_payloads) <= set(self.payloads), f"effects of IDs never sent: {effect_payloads}"
        for record in self.sent:
            if record.bad_reason is not None:
                assert record.coordinates in dead_sources, f"{record} never dead-lettered"
        for message_id in self.payloads:
            records = [r for r in self.sent if r.message_id == message_id]
            applied = effect_payloads.get(message_id, [])
            failed = [r for r in records if reasons.get(r.coordinates) == "handler-error"]
            assert len(applied) + len(failed) == 1, (
                f"{message_id!r}: {len(applied)} effect(s) and {len(failed)} handler-error dead letter(s); "
                f"records {records}"
            )
            winner = applied[0].encode() if applied else failed[0].value
            for record in records:
                if record.value != winner:
                    assert reasons.get(record.coordinates) == "fingerprint-mismatch", (
                        f"{record}: another payload under {message_id!r} (the first was {winner!r}), "
                        f"but dead-lettered as {reasons.get(record.coordinates)}"
                    )
                elif not failed or record is not failed[0]:
                    assert record.coordinates not in dead_sources, f"{record} (a duplicate) dead-lettered"


def _source(record: TwinRecord) -> tuple[str, int, int]:
    return ((record.header("x-exactlyonce-topic") or b"").decode(),
            int(record.header("x-exactlyonce-partition") or b"-1"), int(record.header("x-exactlyonce-offset") or b"-1"))


def _sha256(value: bytes) -> str:
    import hashlib

    return hashlib.sha256(value).hexdigest()
