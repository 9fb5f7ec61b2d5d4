"""The relay: :class:`Relay` sends one batch (steps 1 to 4 of :mod:`exactlyonce.outbox`); :class:`RelayThread` runs one.

A batch's route: :func:`rows.take <exactlyonce.outbox.rows.take>` locks the
rows it may send, a :class:`~exactlyonce.outbox.dispatch.Dispatcher` sends
them through the :class:`~exactlyonce.outbox.sender.Sender`, and
:func:`rows.settle <exactlyonce.outbox.rows.settle>` marks what became of
them, all in one transaction. :meth:`Relay.run` repeats that (see
:mod:`exactlyonce.outbox.loop`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import settings
from exactlyonce._duration import format_duration
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.outbox import loop, rows
from exactlyonce.outbox.dispatch import Dispatcher
from exactlyonce.outbox.loop import DEFAULT_RETENTION, Backlog, OutboxMetrics
from exactlyonce.outbox.sender import Sender
from exactlyonce.outbox.table import missing_columns
from exactlyonce.signing import SigningKey, resolve_signing_key
from exactlyonce.storage import engine as _db
from exactlyonce.storage.schema import outbox

log = logging.getLogger("exactlyonce")


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
        signing_key = resolve_signing_key(signing_key)
        self._backlog = Backlog(engine, metrics)
        servers = settings.bootstrap_servers(bootstrap_servers)
        self._engine = engine
        self.batch_size = batch_size
        self._sender = Sender(servers, producer_config or {}, signing_key)
        self._dispatcher = Dispatcher(self._sender)
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
        with rows.connect(self._engine) as conn, conn.begin():
            taken = rows.take(conn, limit or self.batch_size)
            if not taken:
                return 0
            # Outside the dispatcher: a producer that cannot be created is no refused record.
            self._sender.producer()
            try:
                batch = self._dispatcher.send(taken)
            except BaseException:
                self._sender.reset()
                raise
            rows.settle(conn, batch.sent, batch.refused)
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
        # A stop request also ends a flush at once (the rows not yet
        # acknowledged stay pending and are sent again later).
        self._sender.cancel = stop
        try:
            loop.run(self, stop, self._backlog, engine=self._engine, idle_wait=idle_wait, retention=retention,
                     max_backoff=max_backoff)
        finally:
            self._sender.cancel = None

    def close(self) -> None:
        """Close the Kafka connection."""
        self._sender.reset()

    def pending(self) -> int:
        """The number of rows not yet sent, refused ones included (one COUNT over the ``sent_at`` index)."""
        return rows.counts(self._engine)[0]


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
