"""The transactional outbox: publish inside a database transaction, relay to Kafka after it commits.

A record sent to Kafka from a handler goes out even if the handler's
transaction then rolls back. :func:`publish` instead stores the record in
``exactlyonce_outbox`` through the caller's session, so it exists if and only
if the caller's transaction commits. A :class:`Relay` sends the pending rows:

1. in ONE database transaction, lock the oldest pending rows (``FOR UPDATE
   SKIP LOCKED``, so concurrent relays take different rows; on SQLite
   ``BEGIN IMMEDIATE`` serialises the relays instead);
2. hold back every row that an earlier pending row of its topic and key
   precedes outside this batch (another relay holds it): sending ours first
   would overtake it;
3. send the rest in ``id`` order through :class:`~exactlyonce.Producer` and
   wait for every acknowledgement (``acks=all``);
4. set ``sent_at`` and commit.

A relay that dies between (3) and (4) leaves its rows pending, and they are
sent again: delivery is at-least-once, each copy with the row's stable
``message-id`` header, so an exactlyonce consumer applies it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from exactlyonce import _db
from exactlyonce.app import _LEGAL_TOPIC, BOOTSTRAP_SERVERS_ENV
from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError
from exactlyonce.ids import DEFAULT_HEADER, MAX_MESSAGE_ID_LENGTH
from exactlyonce.message import headers_from_json, headers_to_json
from exactlyonce.producer import Producer, encode_value, new_message_id
from exactlyonce.retry import Retry
from exactlyonce.schema import outbox
from exactlyonce.signing import SigningKey, check_signing_key, signing_key_from_env

log = logging.getLogger("exactlyonce")

#: How long sent rows are kept before :meth:`Relay.run` prunes them.
DEFAULT_RETENTION = timedelta(days=7)
#: How often :meth:`Relay.run` prunes.
PRUNE_INTERVAL = timedelta(hours=1)
#: At most one backlog count per this interval (a COUNT is cheap, not free).
BACKLOG_INTERVAL = timedelta(seconds=1)


class OutboxMetrics(Protocol):
    """What a relay reports to: anything with this method (a Prometheus gauge's owner, a test's list)."""

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
    after the other (the relay follows the outbox's ``id`` order).
    """
    if not isinstance(topic, str) or not _LEGAL_TOPIC.fullmatch(topic):
        raise ConfigurationError(
            f"illegal topic name {topic!r}: Kafka allows 1 to 249 ASCII letters, digits, '.', '_' and '-'"
        )
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
            created_at=_utcnow(),
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


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Relay:
    """Sends the outbox's pending rows to Kafka in ``id`` order and marks them sent.

    Any number of relays may run against one database (``App.run()`` runs
    one, ``exactlyonce relay`` another): a row is locked by the relay sending
    it, and the others skip it and hold back the later rows of its topic and
    key. ``bootstrap_servers`` defaults to ``EXACTLYONCE_BOOTSTRAP_SERVERS``;
    ``producer_config`` is forwarded to kafka-python's ``KafkaProducer``
    (defaults ``acks="all"``, ``enable_idempotence=True``). ``batch_size``
    rows are sent per database transaction.

    ``signing_key``: ``(key id, secret)`` to sign every record over its row's
    message ID, key and value (see :mod:`exactlyonce.signing`); default
    ``EXACTLYONCE_SIGNING_KEY`` if set, else unsigned. Signing happens when a
    row is sent, not when it is published, so rotating the key also covers
    rows still pending. ``metrics``: an :class:`OutboxMetrics`, told the
    number of pending rows after each round of :meth:`run` (at most once a
    second), so a growing backlog (broker down, a refused row holding back
    its key) can be alerted on.
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
        self._signing_key = check_signing_key(signing_key) if signing_key is not None else signing_key_from_env()
        self._metrics = metrics
        self._next_backlog = 0.0
        servers = bootstrap_servers or os.environ.get(BOOTSTRAP_SERVERS_ENV)
        if not servers:
            raise ConfigurationError(
                f"no Kafka bootstrap servers: pass bootstrap_servers= or set {BOOTSTRAP_SERVERS_ENV}"
            )
        self._engine = engine
        self._servers = servers
        self._producer_config = dict(producer_config or {})
        self.batch_size = batch_size
        self._producer: Producer | None = None
        # Set while run() runs: a stop request ends a flush at once (the rows
        # not yet marked sent stay pending and are sent again later).
        self._cancel: threading.Event | None = None
        # Rows the broker refused for good (too large, ...). They stay pending,
        # and hold back their key's later rows, until a relay restarts.
        self._refused: set[int] = set()
        #: Records this relay sent and marked sent.
        self.published = 0

    def run_once(self, limit: int | None = None) -> int:
        """Send one batch of at most ``limit`` pending rows and mark them sent; return how many.

        Raises :class:`~exactlyonce.TransientError` or SQLAlchemy's error when
        the broker or the database fails; the batch then stays pending.
        """
        with self._connect() as conn, conn.begin():
            stmt = (
                sa.select(outbox)
                .where(outbox.c.sent_at.is_(None))
                .order_by(outbox.c.id)
                .limit(limit or self.batch_size)
                .with_for_update(skip_locked=True)
            )
            if self._refused:
                stmt = stmt.where(outbox.c.id.not_in(self._refused))
            rows = self._unblocked(conn, conn.execute(stmt).all())
            if not rows:
                return 0
            # Outside _send: a producer that cannot be created is no refused record.
            self._producer_or_new()
            sent = self._send(rows)
            if sent:
                conn.execute(sa.update(outbox).where(outbox.c.id.in_(sent)).values(sent_at=_utcnow()))
        log.debug("relayed %d outbox rows", len(sent))
        self.published += len(sent)
        return len(sent)

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
        unavailable) is retried with exponential backoff up to
        ``max_backoff``; any other is logged with its traceback and retried
        after ``max_backoff``. Every hour, rows sent more than ``retention``
        ago are pruned (``None``: never).
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
        """The number of rows not yet sent (one COUNT over the ``sent_at`` index)."""
        with self._engine.connect() as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            ).scalar_one())

    def _report_backlog(self) -> None:
        # After failed rounds too: a backlog growing while the broker is down
        # is what the metric is for. A failing count only skips this report.
        if self._metrics is None or time.monotonic() < self._next_backlog:
            return
        self._next_backlog = time.monotonic() + BACKLOG_INTERVAL.total_seconds()
        try:
            self._metrics.outbox_backlog(self.pending())
        except Exception as exc:
            log.debug("outbox backlog not reported: %s", exc)

    # -- a batch ------------------------------------------------------------

    def _connect(self) -> sa.Connection:
        conn = self._engine.connect()
        if conn.dialect.name in ("postgresql", "mysql", "mariadb"):
            # Each statement sees the latest commits, and MySQL takes no gap
            # locks: under REPEATABLE READ the locked range would block the
            # publishers' inserts until the batch is sent.
            conn.execution_options(isolation_level="READ COMMITTED")
        return conn

    def _unblocked(self, conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[sa.Row[Any]]:
        """The rows of the batch that no earlier pending row of the same ordering key precedes."""
        if not rows:
            return []
        batch = [row.id for row in rows]
        # SKIP LOCKED passed over a pending row with a smaller id only if
        # another relay holds it (or it committed just now): it goes first.
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

    def _send(self, rows: Sequence[sa.Row[Any]]) -> list[int]:
        """Send ``rows`` in order and wait for the acknowledgements; return the ids sent."""
        try:
            self._send_all(rows)
            return [row.id for row in rows]
        except TransientError:
            # A fresh producer (and producer ID) for the next attempt.
            self._reset_producer()
            raise
        except ConfigurationError:
            self._reset_producer()
        # The broker refuses one of them for good: find it, a record at a time.
        # Later rows of its key that went out in the failed round stay out: a
        # record cannot be taken back.
        sent: list[int] = []
        held: set[str] = set()
        for row in rows:
            if row.ordering_key in held:
                continue
            try:
                self._send_all([row])
            except ConfigurationError as exc:
                log.error("outbox row %d (message %s to %s) stays pending, and so do the later rows of "
                          "its key, until the relay restarts: %s", row.id, row.message_id, row.topic, exc)
                self._refused.add(row.id)
                held.add(row.ordering_key)
                self._reset_producer()
                continue
            except TransientError:
                self._reset_producer()
                raise
            sent.append(row.id)
        return sent

    def _send_all(self, rows: Sequence[sa.Row[Any]]) -> None:
        producer = self._producer_or_new()
        for row in rows:
            producer.send(row.topic, row.value, key=row.key, message_id=row.message_id,
                          headers=_decode_headers(row.headers))
        producer.flush(cancel=self._cancel)

    def _producer_or_new(self) -> Producer:
        if self._producer is None:
            # One round: a record that failed is not re-sent behind the later
            # records of its partition, which would break its key's order; the
            # whole batch stays pending and is sent again, in order.
            self._producer = Producer(self._servers, config=self._producer_config, retry=Retry(attempts=1),
                                      signing_key=self._signing_key)
        return self._producer

    def _reset_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # Its flush re-raises the failure that made us drop it. Nothing it
            # still holds is waited for: those rows stay pending.
            with contextlib.suppress(ExactlyOnceError):
                producer.close(timedelta(0))


class RelayThread:
    """A :class:`Relay` in a daemon thread, as ``App.run()`` runs it.

    The thread first checks that the outbox table exists; without it (a
    database not yet upgraded past revision 0003) it logs that and ends.
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
            log.warning("the outbox relay did not stop within %s; leaving it behind", timeout)

    def _main(self) -> None:
        try:
            if self._has_table():
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
    cutoff = _utcnow() - older_than
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
