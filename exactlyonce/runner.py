"""The loop: poll -> claim -> handle -> database commit -> offset commit.

Ordering is the whole guarantee:

1. the message ID is computed once, before anything is written;
2. the dedup row and the handler's writes commit in ONE database transaction;
3. the Kafka offset is committed only after that database commit.

A crash before (2) leaves nothing behind: the record is redelivered and
applied. A crash between (2) and (3) redelivers a record whose dedup row
exists: it is skipped. Nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from exactlyonce import _db, ids
from exactlyonce._kafka import Consumer, DeadLetterProducer, TopicPartition, to_message
from exactlyonce.app import OnMismatch
from exactlyonce.errors import (
    ConfigurationError,
    DeadLetter,
    FingerprintMismatch,
    HandlerSignal,
    MessageError,
    OversizedValue,
    Skip,
    TransientError,
)
from exactlyonce.message import Message
from exactlyonce.schema import Outcome, processed
from exactlyonce.store import Claim, claim, stored_fingerprint

if TYPE_CHECKING:
    from exactlyonce.app import App, Handler

log = logging.getLogger("exactlyonce")

T = TypeVar("T")

#: Header names added to a dead-lettered record (the original headers are kept).
DLQ_HEADER_PREFIX = "x-exactlyonce-"


class _Stopped(BaseException):
    """Raised out of a retry wait when a stop was requested (never escapes run)."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) or _db.is_transient(exc)


def _is_handler_failure(exc: BaseException) -> bool:
    """Whether a handler's exception is worth another attempt (policy permitting)."""
    return isinstance(exc, Exception) and not (
        isinstance(exc, MessageError | HandlerSignal) or _is_transient(exc)
    )


class Runner:
    """Runs an :class:`~exactlyonce.App` until its stop event is set."""

    def __init__(self, app: App, stop: threading.Event, *, poll_timeout_s: float = 0.5) -> None:
        self._app = app
        self._handlers = app.handlers
        self._stop = stop
        self._poll_timeout_s = poll_timeout_s
        self._engine = app.engine
        #: Next offset to commit per partition: everything below is in the database.
        self._done: dict[TopicPartition, int] = {}
        self._consumer: Consumer | None = None
        self._producer: DeadLetterProducer | None = None
        self.stats = app.stats

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; always commit what is done and leave the group."""
        try:
            self._check_schema()
        except _Stopped:
            return
        self._consumer = Consumer(
            bootstrap_servers=self._app.bootstrap_servers,
            group_id=self._app.group_id,
            topics=self._handlers.keys(),
            config=self._app.consumer_config,
            on_revoked=self._on_revoked,
        )
        log.info("consuming %s as group %r", ", ".join(sorted(self._handlers)), self._app.group_id)
        try:
            while not self._stop.is_set():
                try:
                    batch = self._consumer.poll(self._poll_timeout_s)
                except TransientError as exc:
                    log.warning("%s; polling again", exc)
                    self._stop.wait(1.0)
                    continue
                if batch:
                    self._process_batch(batch)
                    self._commit()
        finally:
            self._commit()
            self._consumer.close()
            if self._producer is not None:
                self._producer.close()
            log.info("stopped: %s", dict(self.stats))

    def _check_schema(self) -> None:
        def check() -> bool:
            return sa.inspect(self._engine).has_table(processed.name)

        if not self._retry_transient(check):
            raise ConfigurationError(
                f"table {processed.name} is missing: run `exactlyonce db upgrade` first"
            )

    # -- the batch ----------------------------------------------------------

    def _process_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        # Next record to process per partition; on an abort every partition is
        # rewound to it so that the next poll hands those records back.
        pending = {tp: records[0].offset for tp, records in batch.items() if records}
        try:
            for tp, records in batch.items():
                for record in records:
                    if self._stop.is_set():
                        raise _Stopped
                    outcome = self._process(to_message(record))
                    self.stats[outcome] += 1
                    pending[tp] = record.offset + 1
                    self._done[tp] = record.offset + 1
                del pending[tp]
        except TransientError as exc:
            log.error("%s; rewinding to retry after the next poll", exc)
            for tp, offset in pending.items():
                self._consumer_or_fail().seek(tp, offset)
        except _Stopped:
            # Unprocessed records stay uncommitted: the next owner gets them.
            return

    def _process(self, message: Message) -> str:
        handler = self._handlers[message.topic]
        try:
            return self._retry_transient(lambda: self._handle(handler, message))
        except TransientError:
            raise
        except Exception as exc:
            if _is_transient(exc):
                raise TransientError(f"{message.where()}: {exc}") from exc
            raise

    def _handle(self, handler: Handler, message: Message) -> str:
        """One complete try at a record: apply, skip, or dead-letter it."""
        try:
            if handler.max_value_bytes is not None and len(message.value or b"") > handler.max_value_bytes:
                raise OversizedValue(
                    f"{message.where()}: value has {len(message.value or b'')} bytes, "
                    f"more than max_value_bytes={handler.max_value_bytes}"
                )
            message_id = ids.resolve(handler.message_id, message)
        except MessageError as exc:
            return self._dead_letter(handler, message, None, exc, attempts=0)

        attempts = 0

        def attempt() -> str:
            nonlocal attempts
            attempts += 1
            return self._apply(handler, message, message_id)

        try:
            return handler.retry.retrying(retryable=_is_handler_failure, sleep=self._sleep)(attempt)
        except Skip as signal:
            log.info("%s: handler skipped %r: %s", message.where(), message_id, signal.reason)
            return self._record_skip(handler, message, message_id)
        except FingerprintMismatch as exc:
            self.stats["fingerprint_mismatch"] += 1
            if handler.on_fingerprint_mismatch is OnMismatch.SKIP:
                log.warning("%s; skipped as a duplicate", exc)
                return "duplicate"
            return self._dead_letter(handler, message, message_id, exc, attempts)
        except (DeadLetter, MessageError) as exc:
            return self._dead_letter(handler, message, message_id, exc, attempts)
        except Exception as exc:
            if _is_transient(exc):
                raise
            log.error("%s: handler for %s failed after %d attempt(s): %s: %s", message.where(),
                      handler.scope, attempts, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return self._dead_letter(handler, message, message_id, exc, attempts)

    def _apply(self, handler: Handler, message: Message, message_id: str) -> str:
        with Session(self._engine) as session, session.begin():
            # The dedup row goes in first: the unique index decides who owns
            # the message before any effect is written.
            if claim(session, handler.scope, message_id, message) is Claim.DUPLICATE:
                stored = stored_fingerprint(session, handler.scope, message_id)
                if stored is not None and stored != message.fingerprint():
                    raise FingerprintMismatch(
                        f"{message.where()}: message ID {message_id!r} was processed before "
                        f"with a different payload (sha256 {stored[:12]}…, now "
                        f"{message.fingerprint()[:12]}…)"
                    )
                log.debug("%s: duplicate %r skipped", message.where(), message_id)
                return "duplicate"
            handler.func(message, session)
        return "applied"

    def _record_skip(self, handler: Handler, message: Message, message_id: str) -> str:
        with Session(self._engine) as session, session.begin():
            claimed = claim(session, handler.scope, message_id, message, outcome=Outcome.SKIPPED)
        return "skipped" if claimed is Claim.NEW else "duplicate"

    # -- dead letters -------------------------------------------------------

    def _dead_letter(
        self,
        handler: Handler,
        message: Message,
        message_id: str | None,
        exc: BaseException,
        attempts: int,
    ) -> str:
        # A record without a usable ID, or whose ID belongs to another payload,
        # is recorded under its coordinates, so that a redelivery of the same
        # record is not dead-lettered twice.
        if message_id is None or isinstance(exc, FingerprintMismatch):
            record_id = _coordinates_id(message)
        else:
            record_id = message_id
        reason = getattr(exc, "reason", None) or "handler-error"
        headers = [
            *message.headers,
            *(
                (DLQ_HEADER_PREFIX + name, value.encode("utf-8"))
                for name, value in (
                    ("reason", reason),
                    ("error-type", type(exc).__name__),
                    ("error-message", str(exc)[:1000]),
                    ("topic", message.topic),
                    ("partition", str(message.partition)),
                    ("offset", str(message.offset)),
                    ("message-id", message_id or ""),
                    ("attempts", str(attempts)),
                    ("scope", handler.scope),
                )
            ),
        ]
        with Session(self._engine) as session, session.begin():
            if (
                claim(session, handler.scope, record_id, message, outcome=Outcome.DEAD_LETTERED)
                is Claim.DUPLICATE
            ):
                return "duplicate"
            # Publish inside the transaction: if the broker does not acknowledge,
            # the dead-letter row rolls back and the offset does not advance.
            self._dead_letter_producer().publish(
                handler.dead_letter_topic, key=message.key, value=message.value, headers=headers
            )
        self.stats[f"dead_lettered:{reason}"] += 1
        log.error("%s: dead-lettered to %s (%s: %s)", message.where(),
                  handler.dead_letter_topic, reason, exc)
        return "dead_lettered"

    def _dead_letter_producer(self) -> DeadLetterProducer:
        if self._producer is None:
            self._producer = DeadLetterProducer(
                bootstrap_servers=self._app.bootstrap_servers, config=self._app.producer_config
            )
        return self._producer

    # -- offsets ------------------------------------------------------------

    def _commit(self) -> None:
        offsets = dict(self._done)
        if offsets and self._consumer_or_fail().commit(offsets):
            for tp, offset in offsets.items():
                if self._done.get(tp) == offset:
                    del self._done[tp]

    def _on_revoked(self, revoked: set[TopicPartition], lost: bool) -> None:
        # Called inside poll() before the partitions move to another member.
        # Offsets are committed after every batch, so something is left only
        # if that commit failed; send it now unless this member was evicted
        # (then the commit cannot succeed). Either way nothing is lost: an
        # uncommitted record is redelivered to the next owner and skipped.
        offsets = {tp: self._done.pop(tp) for tp in revoked if tp in self._done}
        if offsets and not lost:
            self._consumer_or_fail().commit_async(offsets)

    def _consumer_or_fail(self) -> Consumer:
        if self._consumer is None:  # pragma: no cover - run() sets it first
            raise RuntimeError("consumer not started")
        return self._consumer

    # -- retries ------------------------------------------------------------

    def _retry_transient(self, fn: Callable[[], T]) -> T:
        """Retry ``fn`` on transient failures for the app's budget, then raise."""
        return Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_delay(self._app.transient_retry_budget.total_seconds()),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "transient failure, retrying: %s", state.outcome and state.outcome.exception()
            ),
            reraise=True,
        )(fn)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped


def _coordinates_id(message: Message) -> str:
    coordinates = f"@{message.topic}/{message.partition}/{message.offset}"
    if len(coordinates) <= ids.MAX_MESSAGE_ID_LENGTH:
        return coordinates
    return "@" + hashlib.sha256(coordinates.encode()).hexdigest()
