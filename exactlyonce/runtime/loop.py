"""The loop: poll -> claim -> handle -> database commit -> offset commit.

Ordering is the whole guarantee:

1. the message ID is computed once, before anything is written;
2. the dedup row and the handler's writes commit in ONE database transaction;
3. the Kafka offset is committed only after that database commit.

A crash before (2) leaves nothing behind: the record is redelivered and
applied. A crash between (2) and (3) redelivers a record whose dedup row
exists: it is skipped. Nothing is lost and nothing is applied twice.

``async def`` handlers run on ONE event loop that the worker owns:
:meth:`Runner.run` then runs the same sync loop below under SQLAlchemy's
``greenlet_spawn`` on it, each async handler's transactions on the App's
async engine (their blocking calls become awaits), and each handler is
awaited in place, inside its transaction. kafka-python's heartbeats run on
their own thread, whatever the loop does.

A record's route: :meth:`Runner.run` polls a batch; :meth:`Runner._process`
hands each topic's records, ``batch_size`` at a time, to its handler's path
(:mod:`~exactlyonce.runtime.dedup` or :mod:`~exactlyonce.runtime.ordered`),
which decides and commits them (:mod:`~exactlyonce.runtime.booking` counts
each decision, :mod:`~exactlyonce.runtime.deadletter` sends dead letters);
then the offsets of the committed records are committed. A transient failure
that outlasts its budget (:mod:`~exactlyonce.runtime.transient`) rewinds the
batch instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, util
from sqlalchemy.util import concurrency

from exactlyonce import _session
from exactlyonce._kafka import Consumer, RecordProducer, TopicPartition
from exactlyonce._kafka import consumer_factory as consumer_factory_of
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.message import Message
from exactlyonce.metrics import Metrics
from exactlyonce.runtime.booking import Bookkeeper, Observer
from exactlyonce.runtime.calls import Calls
from exactlyonce.runtime.deadletter import DeadLetters
from exactlyonce.runtime.dedup import Dedup
from exactlyonce.runtime.offsets import Offsets
from exactlyonce.runtime.ordered import Ordered
from exactlyonce.runtime.sizing import ConflictSizing
from exactlyonce.runtime.transient import Stopped, Transient
from exactlyonce.storage import migrate
from exactlyonce.storage.schema import counters, parked, processed, sequence_streams

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

Batch = dict[TopicPartition, list[Message]]

#: How long, at least, a starting worker waits for a broker that does not answer yet.
STARTUP_PATIENCE = timedelta(minutes=2)


class Settings(Protocol):
    """What a :class:`Runner` reads of its :class:`~exactlyonce.App` (the runtime does not import the App)."""

    group_id: str
    #: The client the consumer runs on (``kafka-python`` or ``confluent``), unless a test gives its factory.
    kafka_client: str
    consumer_config: dict[str, Any]
    producer_config: dict[str, Any]
    transient_retry_budget: timedelta
    batch_wait: timedelta
    signing_keys: dict[str, bytes] | None
    metrics: Metrics
    stats: Counter[str]

    @property
    def handlers(self) -> Mapping[str, Handler]: ...

    @property
    def bootstrap_servers(self) -> str: ...

    @property
    def lock_timeout(self) -> timedelta:
        """How long a statement waits for a row lock before it fails as transient."""
        ...

    @property
    def batch_lock_timeout(self) -> timedelta | None:
        """How long a statement in a transaction of several records waits for a lock (PostgreSQL; None: unbounded)."""
        ...

    @property
    def engine(self) -> Engine: ...

    @property
    def async_engine(self) -> AsyncEngine:
        """The engine of the ``async def`` handlers (read only when there are some)."""
        ...

    #: Whether the App made ``async_engine`` itself (from its URL): then the
    #: worker disposes of its pool when its event loop ends, since the
    #: connections belong to that loop. An engine the App was given is never
    #: disposed of.
    owns_async_engine: bool


class Runner:
    """Runs an :class:`~exactlyonce.App` until its stop event is set."""

    def __init__(
        self,
        app: Settings,
        stop: threading.Event,
        *,
        poll_timeout_s: float = 0.5,
        consumer_factory: Callable[..., Consumer] | None = None,
        producer_factory: Callable[..., RecordProducer] = RecordProducer,
        observer: Observer | None = None,
    ) -> None:
        """``consumer_factory`` / ``producer_factory`` are for tests (the in-memory twins of
        :mod:`exactlyonce.testing`): called with :class:`Consumer`'s / :class:`RecordProducer`'s keywords;
        without ``consumer_factory``, the consumer of the app's ``kafka_client``.
        ``observer`` is told every committed decision (see :class:`~exactlyonce.runtime.booking.Bookkeeper`)."""
        self._app = app
        self._consumer_factory: Callable[..., Consumer] = (
            consumer_factory if consumer_factory is not None else consumer_factory_of(app.kafka_client))
        self._handlers = app.handlers
        self._stop = stop
        self._poll_timeout_s = poll_timeout_s
        #: Next offset to commit per partition: everything below is in the database.
        self._offsets = Offsets()
        self._consumer: Consumer | None = None
        self.stats = app.stats
        self._metrics = app.metrics
        self._transient = Transient(stop, app.transient_retry_budget, app.metrics)
        handlers = list(self._handlers.values())
        #: Each kind of handler's engine, only where the App has that kind.
        self._engine = app.engine if any(not h.is_async for h in handlers) else None
        self._async_engine = app.async_engine if any(h.is_async for h in handlers) else None
        self._books = Bookkeeper(self._engine, app.group_id, app.stats, app.metrics, self._async_engine,
                                 observer=observer, batch_lock_timeout=_lock_wait_bound(app))
        self._dead_letters = DeadLetters(self._books, self._transient, lambda: producer_factory(
            bootstrap_servers=app.bootstrap_servers, config=app.producer_config))
        calls = Calls(app.signing_keys, app.metrics)
        #: Records per transaction, shrunk after lock conflicts (both paths).
        self._sizing = ConflictSizing()
        self._dedup = Dedup(self._books, self._transient, self._dead_letters, calls, self._sizing)
        self._ordered = Ordered([h for h in handlers if h.sequence is not None], self._books, self._transient,
                                self._dead_letters, calls, app.metrics, self._sizing)

    @property
    def more_work(self) -> bool:
        """A bounded step left work for right after the next poll (releases of parked records cut short)."""
        return self._ordered.more_work

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; always commit what is done and leave the group.

        With ``async def`` handlers, on an event loop of the worker's own,
        made here and closed on the way out.
        """
        if self._async_engine is None or _on_a_workers_loop():
            # (A runner started from inside another's work, such as a test's
            # second worker, runs on the first one's loop, already in hand.)
            self._run()
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no event loop runs in this thread: the worker makes its own
        else:
            raise ConfigurationError(
                "App.run() with async def handlers was called from a coroutine, on a running event loop: "
                "the worker runs its own event loop and blocks until it stops; run it in a thread of "
                "its own (await asyncio.to_thread(app.run, install_signal_handlers=False))"
            )
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run_on_loop(self._async_engine))
        finally:
            try:
                _cancel_tasks_left(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _run_on_loop(self, async_engine: AsyncEngine) -> None:
        try:
            await util.greenlet_spawn(self._run)
        finally:
            if self._app.owns_async_engine:
                # Its pooled connections belong to this loop, which ends here.
                await async_engine.dispose()

    def _run(self) -> None:
        try:
            self._check_schema()
        except Stopped:
            return
        try:
            # A broker that does not answer yet (a cluster restarting while this
            # worker starts) is waited for, for the transient retry budget but
            # at least STARTUP_PATIENCE: one bootstrap attempt alone can take
            # kafka-python's bootstrap_timeout_ms (30 s).
            self._consumer = self._open()
        except Stopped:
            return
        log.info("consuming %s as group %r", ", ".join(sorted(self._handlers)), self._app.group_id)
        awaited = sorted(topic for topic, handler in self._handlers.items() if handler.is_async)
        if awaited:
            log.info("async def handlers (%s) run on the worker's event loop", ", ".join(awaited))
        try:
            while not self._stop.is_set():
                try:
                    batch = self._consumer.poll(0 if self._ordered.more_work else self._poll_timeout_s)
                except TransientError as exc:
                    log.warning("%s; polling again", exc)
                    self._stop.wait(1.0)
                    continue
                if batch:
                    batch = self._fill(batch)
                    self._process(batch)
                    self._report_lag(batch)
                self._offsets.send(self._consumer_or_fail())
                self._ordered.between_polls()
        except _session.Unrunnable as unrunnable:
            # A handler that can never succeed (it returned a coroutine): stop
            # loudly. Its transaction rolled back; what committed before is
            # committed below; the record in hand is redelivered after the fix.
            log.error("%s", unrunnable.error)
            raise unrunnable.error from None
        except Stopped:
            pass  # stopped while reopening the consumer (see _rewind)
        finally:
            if self._consumer is not None:
                self._offsets.commit(self._consumer)
                self._consumer.close()
            self._dead_letters.close()
            log.info("stopped: %s", dict(self.stats))

    def _check_schema(self) -> None:
        needed = [processed, counters]
        if any(handler.sequence is not None for handler in self._handlers.values()):
            needed += [sequence_streams, parked]
        for engine in self._books.engines():
            self._transient.retry(functools.partial(migrate.require_tables, engine, *needed))

    def _fill(self, batch: Batch) -> Batch:
        """Keep polling for up to ``batch_wait`` while the batch is below the largest batch size."""
        wait = self._app.batch_wait.total_seconds()
        target = max(handler.batch_size for handler in self._handlers.values())
        deadline = time.monotonic() + wait
        count = sum(map(len, batch.values()))
        while wait and count < target and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                more = self._consumer_or_fail().poll(remaining)
            except TransientError:
                break
            for tp, records in more.items():
                batch.setdefault(tp, []).extend(records)
                count += len(records)
        # A rebalance inside those polls may have moved partitions away: their
        # records are the new owner's now.
        assigned = self._consumer_or_fail().assignment()
        return {tp: records for tp, records in batch.items() if tp in assigned}

    # -- the poll batch -----------------------------------------------------

    def _process(self, batch: Batch) -> None:
        """Decide and commit ``batch``'s records, chunk by chunk; mark what committed as done."""
        # Next record to process per partition; on an abort every partition is
        # rewound to it so that the next poll hands those records back.
        pending = {tp: records[0].offset for tp, records in batch.items() if records}
        by_topic: dict[str, list[Message]] = {}
        for records in batch.values():
            for record in records:
                by_topic.setdefault(record.topic, []).append(record)
        try:
            for topic, messages in by_topic.items():
                handler = self._handlers[topic]
                path = self._dedup if handler.sequence is None else self._ordered
                start = 0
                while start < len(messages):
                    if self._stop.is_set():
                        raise Stopped
                    chunk = messages[start : start + self._sizing.size(handler)]
                    start += len(chunk)
                    path.process(handler, chunk)
                    # The chunk committed: everything in it is done.
                    for message in chunk:
                        tp = TopicPartition(message.topic, message.partition)
                        pending[tp] = message.offset + 1
                        self._offsets.mark(tp, pending[tp])
        except TransientError as exc:
            log.error("%s; rewinding to retry after the next poll", exc)
            self._rewind(pending)  # (may raise Stopped: _run catches it)
        except Stopped:
            # Unprocessed records stay uncommitted: the next owner gets them.
            return

    def _open(self) -> Consumer:
        return self._transient.retry(at_least=STARTUP_PATIENCE, fn=lambda: self._consumer_factory(
            bootstrap_servers=self._app.bootstrap_servers,
            group_id=self._app.group_id,
            topics=self._handlers.keys(),
            config=self._app.consumer_config,
            on_revoked=self._on_revoked,
        ))

    def _rewind(self, pending: dict[TopicPartition, int]) -> None:
        """Make the next poll return each partition from its first record not in the database."""
        consumer = self._consumer_or_fail()
        try:
            for tp, offset in pending.items():
                consumer.seek(tp, offset)
        except Exception as exc:
            # Polling on would skip the records the seek should have brought
            # back: start a new consumer instead, which reads from the
            # committed offsets (only records in the database are below them).
            log.warning("could not rewind (%s: %s); reopening the consumer at the committed offsets",
                        type(exc).__name__, exc)
            self._offsets.commit(consumer)
            # Marks left (that commit failed) would be sent by the new member
            # for partitions it may not own: drop them (a redelivery, skipped).
            self._offsets = Offsets()
            consumer.close()
            self._consumer = None
            self._consumer = self._open()

    # -- offsets ------------------------------------------------------------

    def _on_revoked(self, revoked: set[TopicPartition], lost: bool) -> None:
        # Called inside poll() before the partitions move to another member.
        # Offsets are sent after every batch, so something is left only if
        # that commit is unanswered or failed; send it again now unless this
        # member was evicted (then the commit cannot succeed). Either way
        # nothing is lost: an uncommitted record is redelivered to the next
        # owner and skipped.
        offsets = self._offsets.revoke(revoked)
        if offsets and not lost:
            self._consumer_or_fail().commit_async(offsets)
        for tp in revoked:
            self._metrics.forget_partition(tp.topic, tp.partition)

    def _report_lag(self, batch: Batch) -> None:
        """Publish each polled partition's lag: records behind the end as of the last fetch."""
        consumer = self._consumer_or_fail()
        assigned = consumer.assignment()  # (a consumer reopened by _rewind owns none yet)
        for tp, records in batch.items():
            if tp not in assigned:
                continue
            end = consumer.highwater(tp)
            if end is not None and records:
                self._metrics.consumer_lag(tp.topic, tp.partition, max(end - records[-1].offset - 1, 0))

    def _consumer_or_fail(self) -> Consumer:
        if self._consumer is None:  # pragma: no cover - run() sets it first
            raise RuntimeError("consumer not started")
        return self._consumer


def _on_a_workers_loop() -> bool:
    """Whether this code runs under ``greenlet_spawn`` (a worker's ``_run`` on its event loop)."""
    in_greenlet = getattr(concurrency, "in_greenlet", None)
    return bool(in_greenlet and in_greenlet())


def _cancel_tasks_left(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks a handler started and left running, and let them finish (as ``asyncio.run`` does)."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("a task left running by a handler failed: %r", task.exception())


def _lock_wait_bound(app: Settings) -> timedelta | None:
    """The bound on a transaction of several records' lock waits, if it is shorter than ``lock_timeout``.

    Equal to ``lock_timeout`` it bounds nothing: a lock wait timeout is then
    the transient failure it is in any transaction, not a lost conflict.
    """
    bound = app.batch_lock_timeout
    return bound if bound is not None and bound < app.lock_timeout else None
