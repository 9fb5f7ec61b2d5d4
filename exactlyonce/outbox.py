"""The transactional outbox: publish inside a database transaction, relay to Kafka after it commits.

A record sent to Kafka from a handler goes out even if the handler's
transaction then rolls back. :func:`publish` instead stores the record in
``exactlyonce_outbox`` through the caller's session, so it exists if and only
if the caller's transaction commits. A :class:`Relay` sends the pending rows:

1. in ONE database transaction, lock the oldest pending rows that are not
   refused and whose topic and key has no refused row (``FOR UPDATE SKIP
   LOCKED``, so concurrent relays take different rows; on SQLite ``BEGIN
   IMMEDIATE`` serialises the relays instead);
2. hold back every row that an earlier pending row of its topic and key
   precedes outside this batch (another relay holds it, or the broker refused
   it): sending ours first would overtake it;
3. send the rest in ``id`` order: rows no larger than one the broker already
   took on their topic go together, each key's run of them in order; a row
   that could be refused for its size goes alone, and its key's later rows
   wait for its outcome (kafka-python's idempotent producer fails every
   record in flight after a refusal). A row that fails stops its key for the
   rest of the batch: no later row of that key can overtake it;
4. in the same transaction, set ``sent_at`` on every acknowledged row (also
   when other rows of the batch failed), and ``refused_at``/``refusal`` on
   every row the broker refused for good (too large, topic invalid or not
   authorised); commit. The refused row and the later rows of its key then
   wait until an operator releases (:func:`release`) or discards
   (:func:`discard`) it. Rows that failed otherwise (broker unavailable, a
   timeout) stay pending and are tried again, after a backoff.

A relay that dies between (3) and (4) leaves its rows pending, and they are
sent again: delivery is at-least-once, each copy with the row's stable
``message-id`` header, so an exactlyonce consumer applies it once.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from exactlyonce import _kafka, settings
from exactlyonce._duration import format_duration
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.ids import DEFAULT_HEADER, MAX_MESSAGE_ID_LENGTH
from exactlyonce.message import headers_from_json, headers_to_json
from exactlyonce.producer import encode_value, new_message_id, stamp_headers
from exactlyonce.signing import SigningKey, resolve_signing_key
from exactlyonce.storage import engine as _db
from exactlyonce.storage.dialects import dialect_of
from exactlyonce.storage.schema import outbox

log = logging.getLogger("exactlyonce")

#: How long sent rows are kept before :meth:`Relay.run` prunes them.
DEFAULT_RETENTION = timedelta(days=7)
#: How often :meth:`Relay.run` prunes.
PRUNE_INTERVAL = timedelta(hours=1)
#: At most one backlog count per this interval (a COUNT is cheap, not free).
BACKLOG_INTERVAL = timedelta(seconds=1)
#: A refusal's text is cut to this many characters in ``exactlyonce_outbox.refusal``.
MAX_REFUSAL_LENGTH = 1000
# The largest row a relay saw acknowledged, per topic, is remembered for at
# most this many topics (then forgotten, which only costs a few rows sent alone).
_MAX_PROVEN_TOPICS = 10_000
#: How often a flush checks whether a stop was requested.
_CANCEL_CHECK_S = 0.1
#: The longest a relay waits for one flight's acknowledgements before it
#: gives up on them (they stay pending) and starts over with a new producer.
FLUSH_LIMIT = timedelta(seconds=30)


class OutboxMetrics(Protocol):
    """What a relay reports to: anything with this method (a Prometheus gauge's owner, a test's list).

    If it also has ``outbox_refused(count)``, that is told the number of rows
    the broker refused and an operator has not yet released or discarded
    (:class:`~exactlyonce.metrics.Metrics` has both).
    """

    def outbox_backlog(self, pending: int) -> None:
        """The number of outbox rows not yet sent, counted after a relay round."""


def publish(
    session: Session | sa.Connection,
    topic: str,
    value: bytes | str | Any,
    *,
    key: bytes | str | None = None,
    message_id: str | None = None,
    headers: Iterable[tuple[str, bytes]] | None = None,
) -> str:
    """Store a record for ``topic`` in the outbox, in the session's transaction; return its message ID.

    The row commits or rolls back with the caller's transaction (in a
    handler: with its writes and the dedup row), so the record is sent if and
    only if they committed. Nothing is sent here: a :class:`Relay` (run by
    ``App.run()`` and by ``exactlyonce relay``) sends it after the commit, at
    least once, with ``message_id`` (default: a new time-ordered ID) in its
    ``message-id`` header. ``value`` and ``key`` are encoded as
    :meth:`Producer.send <exactlyonce.Producer.send>` encodes them.

    Records with the same topic and key reach Kafka in the order they were
    published, within a transaction and across transactions that commit one
    after the other (the relay follows the outbox's ``id`` order). Concurrent
    transactions get no such order: ``id`` is assigned at insert, not at
    commit, so on PostgreSQL and MySQL/MariaDB a row of the transaction that
    commits last may be sent after a row with a larger ``id`` that was sent
    already. Serialise such writers (lock a row per key) where it matters.
    """
    settings.check_topic(topic)
    message_id = message_id or new_message_id()
    if not 0 < len(message_id) <= MAX_MESSAGE_ID_LENGTH:
        raise ConfigurationError(f"message_id must have 1 to {MAX_MESSAGE_ID_LENGTH} characters")
    extra = []
    for name, data in headers or ():
        if not isinstance(name, str) or not isinstance(data, bytes):
            raise ConfigurationError(f"headers must be (str, bytes) pairs, got {(name, data)!r}")
        if name != DEFAULT_HEADER:
            extra.append((name, data))
    raw_key = key.encode("utf-8") if isinstance(key, str) else key
    session.execute(
        sa.insert(outbox).values(
            topic=topic,
            key=raw_key,
            value=encode_value(value),
            headers=headers_to_json(extra),
            message_id=message_id,
            ordering_key=_ordering_key(topic, raw_key),
            created_at=settings.utcnow(),
            sent_at=None,
        )
    )
    return message_id


def _ordering_key(topic: str, key: bytes | None) -> str:
    # Topic names cannot hold "\0", and a null key differs from every key.
    tail = b"\0k" + key if key is not None else b"\0n"
    return hashlib.sha256(topic.encode("ascii") + tail).hexdigest()


def _decode_headers(text: str) -> list[tuple[str, bytes]]:
    return list(headers_from_json(text))


@dataclass(slots=True)
class _Batch:
    """What became of one batch's rows."""

    sent: list[int] = field(default_factory=list)
    #: (row, why) for the rows the broker refused for good.
    refused: list[tuple[sa.Row[Any], str]] = field(default_factory=list)
    #: Rows that failed for another reason (they stay pending), and the first such error.
    failed: int = 0
    failure: BaseException | None = None


class Relay:
    """Sends the outbox's pending rows to Kafka in ``id`` order and marks them sent.

    Any number of relays may run against one database (``App.run()`` runs
    one, ``exactlyonce relay`` another): a row is locked by the relay sending
    it, and the others skip it and hold back the later rows of its topic and
    key. ``bootstrap_servers`` defaults to ``EXACTLYONCE_BOOTSTRAP_SERVERS``;
    ``producer_config`` is forwarded to kafka-python's ``KafkaProducer``
    (defaults ``acks="all"``, ``enable_idempotence=True``). ``batch_size``
    rows are sent per database transaction.

    A row the broker refuses for good (too large for the topic's
    ``max.message.bytes``, topic invalid or not authorised) is marked refused
    with the reason, in the database: it is not sent again, and the later
    rows of its topic and key wait behind it, until an operator releases it
    (:func:`release`, ``exactlyonce outbox release``) or discards it
    (:func:`discard`). Other keys go on. ``exactlyonce status`` lists the
    refused rows.

    ``signing_key``: ``(key id, secret)`` to sign every record over its row's
    message ID, key and value (see :mod:`exactlyonce.signing`); default
    ``EXACTLYONCE_SIGNING_KEY`` if set, else unsigned. Signing happens when a
    row is sent, not when it is published, so rotating the key also covers
    rows still pending. ``metrics``: an :class:`OutboxMetrics`, told the
    number of pending rows (and of refused ones) after each round of
    :meth:`run` (at most once a second), so a growing backlog (broker down,
    a refused row holding back its key) can be alerted on.
    """

    def __init__(
        self,
        engine: Engine,
        bootstrap_servers: str | None = None,
        *,
        producer_config: Mapping[str, Any] | None = None,
        batch_size: int = 100,
        signing_key: SigningKey | None = None,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        self._signing_key = resolve_signing_key(signing_key)
        self._metrics = metrics
        self._next_backlog = 0.0
        servers = settings.bootstrap_servers(bootstrap_servers)
        self._engine = engine
        self._servers = servers
        self._producer_config = dict(producer_config or {})
        self.batch_size = batch_size
        self._producer: _kafka.RecordProducer | None = None
        # Per topic, the size (see _size) of the largest row acknowledged: a
        # row no larger cannot be refused for its size, so the rows of a key
        # up to the next larger one go together.
        self._proven: dict[str, int] = {}
        # Set while run() runs: a stop request ends a flush at once (the rows
        # not yet acknowledged stay pending and are sent again later).
        self._cancel: threading.Event | None = None
        #: Records this relay sent and marked sent.
        self.published = 0
        #: Rows this relay marked refused.
        self.refused = 0

    def run_once(self, limit: int | None = None) -> int:
        """Send one batch of at most ``limit`` pending rows; return how many it settled (sent or refused).

        Acknowledged rows are marked sent and refused rows refused, in one
        transaction. Raises :class:`~exactlyonce.TransientError` after that
        commit when some rows failed otherwise (broker unavailable, a
        timeout: they stay pending), and the error of the database or of
        creating the producer, in which case the whole batch stays pending.
        """
        with self._connect() as conn, conn.begin():
            # Few rows (refused ones wait for an operator): read apart, so the
            # locking select below holds no lock on them.
            held_keys = list(conn.execute(
                sa.select(outbox.c.ordering_key).distinct()
                .where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
            ).scalars())
            stmt = (
                sa.select(outbox)
                .where(outbox.c.sent_at.is_(None), outbox.c.refused_at.is_(None))
                .order_by(outbox.c.id)
                .limit(limit or self.batch_size)
                .with_for_update(skip_locked=True)
            )
            if held_keys:
                stmt = stmt.where(outbox.c.ordering_key.not_in(held_keys))
            rows = self._unblocked(conn, conn.execute(stmt).all())
            if not rows:
                return 0
            # Outside _send: a producer that cannot be created is no refused record.
            self._producer_or_new()
            try:
                batch = self._send(rows)
            except BaseException:
                self._reset_producer()
                raise
            if batch.sent:
                conn.execute(sa.update(outbox).where(outbox.c.id.in_(batch.sent)).values(sent_at=settings.utcnow()))
            for row, reason in batch.refused:
                conn.execute(sa.update(outbox).where(outbox.c.id == row.id)
                             .values(refused_at=settings.utcnow(), refusal=reason[:MAX_REFUSAL_LENGTH]))
        for row, reason in batch.refused:
            log.error("outbox row %d (message %s to %s) refused by the broker: %s; it and the later rows of its "
                      "key wait until `exactlyonce outbox release %d` (or discard)", row.id, row.message_id,
                      row.topic, reason, row.id)
        log.debug("relayed %d outbox rows, %d refused, %d failed", len(batch.sent), len(batch.refused), batch.failed)
        self.published += len(batch.sent)
        self.refused += len(batch.refused)
        if batch.failure is not None:
            raise TransientError(
                f"{batch.failed} outbox row(s) not acknowledged ({len(batch.sent)} sent): {batch.failure}"
            ) from batch.failure
        return len(batch.sent) + len(batch.refused)

    def run(
        self,
        stop: threading.Event,
        *,
        idle_wait: timedelta = timedelta(milliseconds=500),
        retention: timedelta | None = DEFAULT_RETENTION,
        max_backoff: timedelta = timedelta(seconds=30),
    ) -> None:
        """Send batches until ``stop`` is set, waiting ``idle_wait`` whenever a batch is short.

        No failure ends the loop: a transient one (database or broker
        unavailable, rows not acknowledged) is retried with exponential
        backoff up to ``max_backoff``; any other is logged with its
        traceback and retried after ``max_backoff``. Every hour, rows sent
        more than ``retention`` ago are pruned (``None``: never).
        """
        self._cancel = stop
        try:
            self._run(stop, idle_wait, retention, max_backoff)
        finally:
            self._cancel = None

    def _run(
        self, stop: threading.Event, idle_wait: timedelta, retention: timedelta | None, max_backoff: timedelta
    ) -> None:
        failures = 0
        next_prune = time.monotonic()
        while not stop.is_set():
            try:
                if retention is not None and time.monotonic() >= next_prune:
                    prune(self._engine, retention)
                    next_prune = time.monotonic() + PRUNE_INTERVAL.total_seconds()
                sent = self.run_once()
            except Exception as exc:
                if stop.is_set():
                    log.info("outbox relay stopped; rows not acknowledged stay pending (%s)", exc)
                    return
                failures += 1
                if isinstance(exc, TransientError) or _db.is_transient(exc):
                    delay = min(max_backoff.total_seconds(), 0.2 * 2 ** min(failures - 1, 16))
                    log.warning("outbox relay: %s; retrying in %.1fs", exc, delay)
                else:
                    delay = max_backoff.total_seconds()
                    log.exception("outbox relay failed; retrying in %.0fs", delay)
                self._report_backlog()
                stop.wait(delay * random.uniform(0.8, 1.0))
                continue
            failures = 0
            self._report_backlog()
            if sent < self.batch_size:
                stop.wait(idle_wait.total_seconds())

    def close(self) -> None:
        """Close the Kafka connection."""
        self._reset_producer()

    def pending(self) -> int:
        """The number of rows not yet sent, refused ones included (one COUNT over the ``sent_at`` index)."""
        return self._counts()[0]

    def _counts(self) -> tuple[int, int]:
        with self._engine.connect() as conn:
            pending, refused = conn.execute(
                sa.select(sa.func.count(), sa.func.count(outbox.c.refused_at))
                .select_from(outbox).where(outbox.c.sent_at.is_(None))
            ).one()
        return int(pending), int(refused)

    def _report_backlog(self) -> None:
        # After failed rounds too: a backlog growing while the broker is down
        # is what the metric is for. A failing count only skips this report.
        if self._metrics is None or time.monotonic() < self._next_backlog:
            return
        self._next_backlog = time.monotonic() + BACKLOG_INTERVAL.total_seconds()
        try:
            pending, refused = self._counts()
            self._metrics.outbox_backlog(pending)
            report_refused = getattr(self._metrics, "outbox_refused", None)
            if report_refused is not None:
                report_refused(refused)
        except Exception as exc:
            log.debug("outbox backlog not reported: %s", exc)

    # -- a batch ------------------------------------------------------------

    def _connect(self) -> sa.Connection:
        conn = self._engine.connect()
        # READ COMMITTED on PostgreSQL and MySQL/MariaDB: each statement sees
        # the latest commits, and MySQL takes no gap locks: under REPEATABLE
        # READ the locked range would block the publishers' inserts until the
        # batch is sent.
        isolation_level = dialect_of(conn).relay_isolation_level
        if isolation_level is not None:
            conn.execution_options(isolation_level=isolation_level)
        return conn

    def _unblocked(self, conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[sa.Row[Any]]:
        """The rows of the batch that no earlier pending row of the same ordering key precedes."""
        if not rows:
            return []
        batch = [row.id for row in rows]
        # SKIP LOCKED passed over a pending row with a smaller id only if
        # another relay holds it (or it committed just now, or another relay
        # marked it refused since the refused keys were read): it goes first.
        earliest = {
            ordering_key: first
            for ordering_key, first in conn.execute(
                sa.select(outbox.c.ordering_key, sa.func.min(outbox.c.id))
                .where(
                    outbox.c.sent_at.is_(None),
                    outbox.c.ordering_key.in_(sorted({row.ordering_key for row in rows})),
                    outbox.c.id < max(batch),
                    outbox.c.id.not_in(batch),
                )
                .group_by(outbox.c.ordering_key)
            )
        }
        return [row for row in rows if row.ordering_key not in earliest or row.id < earliest[row.ordering_key]]

    def _send(self, rows: Sequence[sa.Row[Any]]) -> _Batch:
        """Send ``rows`` so that each key keeps its order whatever fails; say what became of each.

        kafka-python's idempotent producer treats a refusal as fatal: it
        fails every record in flight with the same error, and whether those
        were written is unknown. So a row that may be refused (one larger
        than every row acknowledged on its topic so far: the first of a
        topic, say) goes alone, and its key's later rows wait for its
        outcome. The other rows ("safe") go together: each key's leading run
        of them. A refusal met with other records in flight (or a failure
        for a batch-mate's fault) is confirmed by sending the row alone
        before the row is marked refused. A row that
        fails otherwise (a timeout, the broker unavailable) stops its key for
        the rest of the batch; the rows of other keys go on.
        """
        batch = _Batch()
        stopped: set[str] = set()  # ordering keys with a row that failed: their later rows wait
        unreachable: set[str] = set()  # topics whose records could not even be queued
        suspects: set[int] = set()  # refused with other records in flight: to be tried alone
        sizes = {row.id: _size(row) for row in rows}
        queue = list(rows)
        while queue:
            wave: list[sa.Row[Any]] = []
            in_wave: set[str] = set()
            solo: sa.Row[Any] | None = None
            closed: set[str] = set()
            for row in queue:
                key = row.ordering_key
                if key in closed:
                    continue
                if row.id in suspects or sizes[row.id] > self._proven.get(row.topic, -1):
                    # Alone, and only as its key's next row.
                    closed.add(key)
                    if solo is None and key not in in_wave:
                        solo = row
                    continue
                wave.append(row)
                in_wave.add(key)
            # The safe rows first (a refusal among them is unlikely); the
            # next solo row once they are settled, the plan then made anew.
            flight = wave or ([solo] if solo is not None else [])
            try:
                outcomes = self._send_wave(flight, unreachable)
            except Exception as exc:
                # A new producer that cannot connect, say: what was
                # acknowledged so far is still marked sent; the rest waits.
                self._reset_producer()
                batch.failed += len(queue)
                batch.failure = batch.failure or exc
                return batch
            settled: set[int] = set()
            failed_keys: set[str] = set()  # in this flight
            for row in flight:
                if row.id not in outcomes:
                    # Not sent: an earlier row of its key was refused at send().
                    continue
                error, conclusive = outcomes[row.id]
                settled.add(row.id)
                if error is None:
                    if row.ordering_key in failed_keys:
                        log.warning("outbox row %d (message %s to %s) was acknowledged after an earlier row of "
                                    "its key failed: that key's order is broken on the topic", row.id,
                                    row.message_id, row.topic)
                    batch.sent.append(row.id)
                    self._prove(row.topic, sizes[row.id])
                    continue
                failed_keys.add(row.ordering_key)
                if _kafka.is_refusal(error):
                    # The topic's limits may have changed: no row of it is safe
                    # until one is acknowledged again.
                    self._proven.pop(row.topic, None)
                if not conclusive and (_kafka.is_refusal(error) or _kafka.is_collateral(error)):
                    suspects.add(row.id)
                    settled.discard(row.id)
                elif _kafka.is_refusal(error):
                    batch.refused.append((row, _reason(error)))
                    stopped.add(row.ordering_key)
                else:
                    batch.failed += 1
                    batch.failure = batch.failure or error
                    stopped.add(row.ordering_key)
            if any(error is not None for error, _ in outcomes.values()):
                # A fresh producer (and producer ID) for what follows: after a
                # refusal kafka-python's idempotent producer is unusable.
                self._reset_producer()
            queue = [row for row in queue if row.id not in settled and row.ordering_key not in stopped]
        return batch

    def _send_wave(
        self, rows: Sequence[sa.Row[Any]], unreachable: set[str]
    ) -> dict[int, tuple[BaseException | None, bool]]:
        """Send ``rows``, wait for every outcome: row id -> (None if acknowledged else the error, conclusive).

        An outcome is conclusive when no other record was in flight with it
        (or it failed before it was queued): another record's refusal cannot
        have caused it. A row refused before it was queued stops the later
        rows of its key in the wave (they are left out of the result); one
        that could not be queued for another reason (no metadata for its
        topic within ``max_block_ms``) fails the rest of its topic at once,
        here and in the later waves of the batch, instead of waiting for each.
        """
        producer = self._producer_or_new()
        outcomes: dict[int, tuple[BaseException | None, bool]] = {}
        halted: set[str] = set()
        queued: list[tuple[sa.Row[Any], Any]] = []
        for row in rows:
            if row.ordering_key in halted:
                continue
            if row.topic in unreachable:
                outcomes[row.id] = (TransientError(f"topic {row.topic!r} unavailable earlier in this batch"), True)
                halted.add(row.ordering_key)
                continue
            headers = stamp_headers(row.message_id, row.key, row.value, _decode_headers(row.headers),
                                    self._signing_key)
            future = producer.send(row.topic, key=row.key, value=row.value, headers=headers)
            if future.is_done and not future.succeeded():
                error = producer.outcome(future)
                outcomes[row.id] = (error, True)
                halted.add(row.ordering_key)
                if error is not None and not _kafka.is_refusal(error):
                    unreachable.add(row.topic)
                continue
            queued.append((row, future))
        self._flush(producer, [future for _, future in queued])
        for row, future in queued:
            outcomes[row.id] = (producer.outcome(future), len(queued) == 1)
        return outcomes

    def _flush(self, producer: _kafka.RecordProducer, futures: list[Any]) -> None:
        """Wait for every future's outcome, for at most FLUSH_LIMIT or until a stop is requested.

        The futures still open then report a timeout: their rows stay pending,
        and the failure gives the relay a new producer. Bounded because
        kafka-python's futures were seen never to complete after every broker
        of a cluster had been restarted (the relay then waited for good).
        """
        deadline = time.monotonic() + FLUSH_LIMIT.total_seconds()
        while not all(future.is_done for future in futures):
            if (self._cancel is not None and self._cancel.is_set()) or time.monotonic() >= deadline:
                return
            producer.flush(_CANCEL_CHECK_S)

    def _prove(self, topic: str, size: int) -> None:
        if topic not in self._proven and len(self._proven) >= _MAX_PROVEN_TOPICS:
            self._proven.clear()
        self._proven[topic] = max(self._proven.get(topic, -1), size)

    def _producer_or_new(self) -> _kafka.RecordProducer:
        if self._producer is None:
            # No re-send rounds beyond kafka-python's own (idempotent, in
            # order): a record that failed is not re-sent behind the later
            # records of its partition; it stays pending for the next batch.
            self._producer = _kafka.RecordProducer(bootstrap_servers=self._servers, config=self._producer_config)
        return self._producer

    def _reset_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                # Stopping: nothing it still holds is waited for (those rows stay pending).
                producer.close(0.0 if self._cancel is not None and self._cancel.is_set() else 10.0)
            except Exception as exc:
                log.debug("closing the relay's producer: %s", exc)


def _reason(error: BaseException) -> str:
    """``Class: detail``; the broker often sends no message, then kafka-python's description of the code."""
    detail = error.args[0] if error.args and error.args[0] is not None else getattr(error, "description", "")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _size(row: sa.Row[Any]) -> int:
    """A row's record size, give or take a constant: key, value, message ID and headers, with their framing."""
    headers = _decode_headers(row.headers)
    return (len(row.key or b"") + len(row.value) + len(row.message_id)
            + sum(len(name.encode("utf-8")) + len(data) + 8 for name, data in headers))


class RelayThread:
    """A :class:`Relay` in a daemon thread, as ``App.run()`` runs it.

    The thread first checks that the outbox table exists; without it (a
    database not yet upgraded past revision 0003), or without its refusal
    columns (revision 0005), it logs that and ends.
    """

    def __init__(
        self,
        engine: Engine,
        bootstrap_servers: str,
        producer_config: Mapping[str, Any],
        *,
        signing_key: SigningKey | None = None,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._relay = Relay(engine, bootstrap_servers, producer_config=producer_config, signing_key=signing_key,
                            metrics=metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="exactlyonce-relay", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: timedelta = timedelta(seconds=10)) -> None:
        """Ask the relay to finish the batch in hand, and wait up to ``timeout``."""
        self._stop.set()
        self._thread.join(timeout.total_seconds())
        if self._thread.is_alive():
            log.warning("the outbox relay did not stop within %s; leaving it behind", format_duration(timeout))

    def _main(self) -> None:
        try:
            if self._has_table():
                missing = missing_columns(self._engine)
                if missing:
                    log.error("table %s lacks column(s) %s (run `exactlyonce db upgrade`): the outbox relay is "
                              "not started", outbox.name, ", ".join(missing))
                    return
                log.info("relaying the outbox")
                self._relay.run(self._stop)
            elif not self._stop.is_set():
                log.info("no table %s (run `exactlyonce db upgrade` to use exactlyonce.publish): "
                         "the outbox relay is not started", outbox.name)
        except Exception:
            log.exception("the outbox relay stopped")
        finally:
            self._relay.close()

    def _has_table(self) -> bool:
        delay = 0.2
        while not self._stop.is_set():
            try:
                return sa.inspect(self._engine).has_table(outbox.name)
            except Exception as exc:
                if not _db.is_transient(exc):
                    raise
                log.warning("outbox relay: %s; retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        return False


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete outbox rows sent more than ``older_than`` ago; return how many.

    Pending rows are never deleted. A sent row is not needed to recognise a
    re-send (the consumer's dedup table does that), so there is no horizon to
    respect: the window only decides how long sent rows stay for inspection.
    Rows go in batches of ``batch_size``, each in its own short transaction.
    """
    if older_than < timedelta(0):
        raise ConfigurationError("older_than must not be negative")
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    cutoff = settings.utcnow() - older_than
    deleted = 0
    while True:
        with engine.begin() as conn:
            ids = list(conn.execute(
                sa.select(outbox.c.id).where(outbox.c.sent_at < cutoff).order_by(outbox.c.sent_at).limit(batch_size)
            ).scalars())
            if ids:
                conn.execute(sa.delete(outbox).where(outbox.c.id.in_(ids)))
        deleted += len(ids)
        if progress is not None and ids:
            progress(len(ids))
        if len(ids) < batch_size:
            return deleted


def missing_columns(engine: Engine) -> list[str]:
    """The columns of ``exactlyonce_outbox`` this version uses that the database's table lacks."""
    present = {column["name"] for column in sa.inspect(engine).get_columns(outbox.name)}
    return [column.name for column in outbox.columns if column.name not in present]


def require_columns(engine: Engine) -> None:
    """Raise :class:`ConfigurationError` if the outbox table predates this version (run ``db upgrade``)."""
    missing = missing_columns(engine)
    if missing:
        raise ConfigurationError(
            f"table {outbox.name} lacks column(s) {', '.join(missing)}: the database is not at the framework's "
            "current revision; run `exactlyonce db upgrade` first"
        )


# -- refused rows ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefusedRow:
    """An outbox row the broker refused for good, and what waits behind it."""

    id: int
    topic: str
    key: bytes | None
    message_id: str
    created_at: datetime
    refused_at: datetime
    #: The broker's error, as the relay met it.
    reason: str
    #: Later pending rows of the same topic and key: they wait until this one is released or discarded.
    waiting: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the key as UTF-8 text with replacement characters)."""
        return {
            "id": self.id, "topic": self.topic,
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "message_id": self.message_id, "created_at": _iso(self.created_at),
            "refused_at": _iso(self.refused_at), "reason": self.reason, "waiting": self.waiting,
        }


def _iso(value: datetime) -> str:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def refused(engine: Engine, *, limit: int | None = None) -> list[RefusedRow]:
    """The rows the broker refused that are still pending, oldest first, each with the rows waiting behind it."""
    with engine.connect() as conn:
        stmt = (
            sa.select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.message_id, outbox.c.ordering_key,
                      outbox.c.created_at, outbox.c.refused_at, outbox.c.refusal)
            .where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
            .order_by(outbox.c.id)
        )
        rows = conn.execute(stmt.limit(limit) if limit is not None else stmt).all()
        waiting: dict[int, int] = {}
        for row in rows:
            waiting[row.id] = int(conn.execute(
                sa.select(sa.func.count()).select_from(outbox).where(
                    outbox.c.ordering_key == row.ordering_key, outbox.c.sent_at.is_(None), outbox.c.id > row.id)
            ).scalar_one())
    return [
        RefusedRow(id=row.id, topic=row.topic, key=row.key, message_id=row.message_id, created_at=row.created_at,
                   refused_at=row.refused_at, reason=row.refusal or "", waiting=waiting[row.id])
        for row in rows
    ]


def release(engine: Engine, ids: Iterable[int] | None = None) -> int:
    """Make refused rows (``ids``, or all with ``None``) pending again; return how many.

    The relays then send each first, then the rows of its key that waited
    behind it, in order. Fix the cause first (the topic's
    ``max.message.bytes``, its ACLs): a row refused again is marked refused
    again.
    """
    stmt = sa.update(outbox).where(outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None))
    if ids is not None:
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        stmt = stmt.where(outbox.c.id.in_(wanted))
    with engine.begin() as conn:
        return int(conn.execute(stmt.values(refused_at=None, refusal=None)).rowcount)


def discard(engine: Engine, ids: Iterable[int]) -> int:
    """Delete refused rows ``ids`` (never sent: their records are lost); return how many.

    The rows that waited behind them go on. Only refused rows are deleted;
    other ids are ignored.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return 0
    with engine.begin() as conn:
        return int(conn.execute(sa.delete(outbox).where(
            outbox.c.id.in_(wanted), outbox.c.refused_at.is_not(None), outbox.c.sent_at.is_(None)
        )).rowcount)
