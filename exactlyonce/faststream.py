"""FastStream integration: an effectively-once Kafka subscriber, as a FastStream middleware.

Install the ``faststream`` extra (``pip install '.[faststream]'`` from a checkout). This module is never
imported by the rest of the package.

:class:`ExactlyOnce` is a FastStream broker middleware: give it to a
``KafkaRouter`` (or the ``KafkaBroker``) and every subscriber of that router
runs with the guarantee of exactlyonce's own workers::

    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker, KafkaRouter
    from exactlyonce import ids
    from exactlyonce.faststream import ExactlyOnce, Session

    router = KafkaRouter(middlewares=[ExactlyOnce(engine, message_id=ids.json_field("transfer_id"))])

    @router.subscriber("transfers", group_id="bank", ack_policy=AckPolicy.MANUAL)
    async def apply(transfer: Transfer, session: Session) -> None:
        session.add(...)          # in the transaction that holds the claim

For each record, in one database transaction on the ``AsyncEngine``: the
record's message ID is claimed (:func:`exactlyonce.claim`), the subscriber
runs with the transaction's ``AsyncSession`` (the :data:`Session`
annotation), and the outcome is counted in ``exactlyonce_counters``; the
transaction commits, and only then is the Kafka offset committed
(``message.ack()``). So:

- a record whose ID was committed before (a redelivery after a crash between
  the commit and the ack, or a re-send) is acked without running the
  subscriber (a duplicate);
- a subscriber that raises is retried by its :class:`~exactlyonce.Retry`
  policy, each attempt in a fresh transaction; then the record is
  dead-lettered through the broker's own publisher, with exactlyonce's
  ``x-exactlyonce-*`` headers, in a transaction that records it in the dedup
  table (``exactlyonce dlq list`` / ``replay`` read these dead letters);
  :class:`~exactlyonce.Skip` and :class:`~exactlyonce.DeadLetter` work as in
  exactlyonce's handlers;
- a record whose ID was seen with another payload is dead-lettered with
  reason ``fingerprint-mismatch`` (or skipped, ``on_fingerprint_mismatch="skip"``);
- a database or broker failure that may pass (:func:`is_transient`), or any
  other failure before the decision commits, rewinds the partition to the
  record (``message.nack()``) after a pause: the record is read again, never
  skipped; a record FastStream cannot parse (a header that is not UTF-8) is
  dead-lettered (:class:`UnparsableRecord`).

The subscriber must be declared with ``ack_policy=AckPolicy.MANUAL`` (the
middleware acknowledges), a ``group_id`` (offsets are committed to the
group), one record at a time (not ``batch=True``), and no
``key_deserializer`` / ``value_deserializer`` (the message ID strategies and
the payload fingerprint read the raw bytes). A subscriber that is not is
refused at its first record: the error is logged and the subscriber stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Annotated, Any

try:
    from faststream import Context
    from faststream.exceptions import IgnoredException, SkipMessage, StopConsume, SubscriberNotFound
    from faststream.middlewares import AckPolicy, BaseMiddleware
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "exactlyonce.faststream needs FastStream with its Kafka broker: install exactlyonce's faststream extra "
        "(pip install '.[faststream]' from a checkout)"
    ) from missing

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session as SyncSession

from exactlyonce import ids, settings
from exactlyonce.errors import (
    ConfigurationError,
    DeadLetter,
    FingerprintMismatch,
    MessageError,
    Skip,
)
from exactlyonce.handler import Handler, OnMismatch
from exactlyonce.message import Message
from exactlyonce.outcome import Outcome
from exactlyonce.retry import Retry
from exactlyonce.runtime import deadletter
from exactlyonce.runtime.booking import reason_of
from exactlyonce.runtime.transient import is_handler_failure
from exactlyonce.runtime.transient import is_transient as _is_transient_database
from exactlyonce.storage.schema import MAX_SCOPE_LENGTH
from exactlyonce.storage.store import Claim, Tally, claim, count, stored_fingerprints

__all__ = [
    "MESSAGE_CONTEXT",
    "MESSAGE_ID_CONTEXT",
    "SESSION_CONTEXT",
    "ExactlyOnce",
    "MessageId",
    "Record",
    "Session",
    "UnparsableRecord",
    "is_transient",
    "to_message",
]

log = logging.getLogger("exactlyonce")

#: The FastStream context names under which a subscriber finds its transaction's session, ...
SESSION_CONTEXT = "exactlyonce_session"
#: ... the record as an :class:`exactlyonce.Message` (raw bytes, all headers), ...
MESSAGE_CONTEXT = "exactlyonce_message"
#: ... and the message ID it was claimed under.
MESSAGE_ID_CONTEXT = "exactlyonce_message_id"

#: Annotate a subscriber's parameter with it to receive the ``AsyncSession`` of the transaction that holds the claim.
Session = Annotated[AsyncSession, Context(SESSION_CONTEXT)]
#: The record as an :class:`exactlyonce.Message`.
Record = Annotated[Message, Context(MESSAGE_CONTEXT)]
#: The message ID the record was claimed under.
MessageId = Annotated[str, Context(MESSAGE_ID_CONTEXT)]

#: The pauses before a record that met a transient failure is read again: doubling up to the last.
TRANSIENT_PAUSE_S = (0.2, 5.0)


class UnparsableRecord(MessageError):
    """FastStream could not parse the record (a header value that is not UTF-8, or null): it never reached the
    subscriber. It is dead-lettered with the headers FastStream cannot carry left out."""

    reason = "unparsable-record"


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass if the record is tried again: a database failure exactlyonce deems transient,
    or a Kafka client error from the broker (``aiokafka.errors.KafkaError``), or what either was raised from."""
    if _is_transient_database(exc):
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_kafka_error(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_kafka_error(exc: BaseException) -> bool:
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError)


def to_message(record: Any) -> Message:
    """An aiokafka ``ConsumerRecord`` as an :class:`exactlyonce.Message` (a null header value becomes ``b""``).

    Raises :class:`~exactlyonce.errors.ConfigurationError` when the key or the
    value is not bytes: a subscriber with a ``key_deserializer`` or
    ``value_deserializer`` hands over no raw bytes to fingerprint.
    """
    key, value = record.key, record.value
    for name, data in (("key", key), ("value", value)):
        if data is not None and not isinstance(data, bytes):
            raise ConfigurationError(
                f"the record's {name} is {type(data).__name__}, not bytes: exactlyonce reads the raw record "
                f"(message IDs, payload fingerprints); remove the subscriber's {name}_deserializer and let "
                "FastStream decode the body"
            )
    timestamp = record.timestamp
    return Message(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        value=value,
        headers=tuple((name, data if data is not None else b"") for name, data in (record.headers or ())),
        timestamp_ms=timestamp if isinstance(timestamp, int) and timestamp >= 0 else None,
    )


class _HandlerSession(AsyncSession):
    """An ``AsyncSession`` that the subscriber may use but not end: the middleware commits or rolls back."""

    lent = False

    def _refuse(self, method: str) -> None:
        if self.lent:
            raise ConfigurationError(
                f"the subscriber called session.{method}(): the transaction holds the record's dedup row and "
                "is committed (or rolled back) by exactlyonce after the subscriber returns (or raises)"
            )

    async def commit(self) -> None:
        self._refuse("commit")
        await super().commit()

    async def rollback(self) -> None:
        self._refuse("rollback")
        await super().rollback()

    async def close(self) -> None:
        self._refuse("close")
        await super().close()


class ExactlyOnce:
    """A FastStream middleware that makes a router's (or broker's) Kafka subscribers effectively-once.

    Args:
        engine: The ``AsyncEngine`` of the database that holds the
            subscriber's data and exactlyonce's tables (``exactlyonce db
            upgrade`` creates them). It is used as given and never disposed of.
        message_id: How a record's message ID is found
            (:mod:`exactlyonce.ids`); by default the ``message-id`` header,
            which :class:`exactlyonce.Producer` stamps.
        scope: The dedup namespace; by default ``"<group_id>:<topic>"``, as
            for an exactlyonce handler (so ``exactlyonce status`` and
            ``inspect`` show the subscriber as a handler of that group).
        dead_letter_topic: Where records that cannot be handled go; by
            default ``"<topic>.dlq"``.
        retry: How a failing subscriber is retried before its record is
            dead-lettered (default :class:`~exactlyonce.Retry`: 3 attempts).
        on_fingerprint_mismatch: What a known message ID with another
            payload gets: ``"dead_letter"`` (default) or ``"skip"``.

    Any bad setting is a :class:`~exactlyonce.errors.ConfigurationError`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        message_id: ids.MessageIdStrategy | None = None,
        scope: str | None = None,
        dead_letter_topic: str | None = None,
        retry: Retry | None = None,
        on_fingerprint_mismatch: OnMismatch | str = OnMismatch.DEAD_LETTER,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"engine must be a SQLAlchemy AsyncEngine (sqlalchemy.ext.asyncio.create_async_engine), "
                f"got {type(engine).__name__}"
            )
        if message_id is not None and not callable(message_id):
            raise ConfigurationError("message_id must be a callable Message -> str (see exactlyonce.ids)")
        if scope is not None and (not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_LENGTH):
            raise ConfigurationError(f"scope must have 1 to {MAX_SCOPE_LENGTH} characters, got {scope!r}")
        if dead_letter_topic is not None:
            settings.check_topic(dead_letter_topic)
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError("retry must be an exactlyonce.Retry")
        try:
            mismatch = OnMismatch(on_fingerprint_mismatch)
        except ValueError as exc:
            raise ConfigurationError(
                f"on_fingerprint_mismatch must be one of {[m.value for m in OnMismatch]}"
            ) from exc
        self.engine = engine
        self.message_id: ids.MessageIdStrategy = message_id or ids.header()
        self.scope = scope
        self.dead_letter_topic = dead_letter_topic
        self.retry = retry or Retry()
        self.on_fingerprint_mismatch = mismatch
        self._sessions = async_sessionmaker(engine, class_=_HandlerSession, expire_on_commit=False)
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._transient_failures = 0

    def __call__(self, msg: Any, /, *, context: Any) -> _Middleware:
        """FastStream calls this for each record (and each publish) with its context."""
        return _Middleware(msg, context=context, config=self)

    def handler(self, scope: str, topic: str) -> Handler:
        """The :class:`~exactlyonce.Handler` that describes ``topic``'s subscription (for dead-letter headers)."""
        found = self._handlers.get((scope, topic))
        if found is None:
            dead_letter_topic = self.dead_letter_topic or f"{topic}.dlq"
            settings.check_topic(dead_letter_topic)
            found = self._handlers[(scope, topic)] = Handler(
                topic=topic, func=_not_called, message_id=self.message_id, scope=scope,
                dead_letter_topic=dead_letter_topic, retry=self.retry, max_value_bytes=None,
                on_fingerprint_mismatch=self.on_fingerprint_mismatch, batch=False, batch_size=1,
            )
        return found

    def _transient_pause(self) -> float:
        first, most = TRANSIENT_PAUSE_S
        self._transient_failures += 1
        return min(most, first * 2.0 ** (self._transient_failures - 1)) * random.uniform(0.5, 1.0)


def _not_called(message: Any, session: Any) -> None:  # pragma: no cover - a Handler needs a func
    raise AssertionError("a FastStream subscriber is called by FastStream")


_CallNext = Callable[[Any], Awaitable[Any]]


class _Middleware(BaseMiddleware):
    """One record's pass through :class:`ExactlyOnce`."""

    def __init__(self, msg: Any, /, *, context: Any, config: ExactlyOnce) -> None:
        super().__init__(msg, context=context)
        self.config = config
        self._reached = False

    # -- FastStream's hooks -------------------------------------------------

    async def consume_scope(self, call_next: _CallNext, msg: Any) -> Any:
        self._reached = True
        subscriber = self.context.get("handler_")
        problem = _misconfiguration(subscriber, msg.raw_message)
        if problem is not None:
            return await self._refuse(problem, msg)
        try:
            record = to_message(msg.raw_message)
        except ConfigurationError as exc:
            return await self._refuse(str(exc), msg)
        scope = self.config.scope or f"{subscriber.group_id}:{record.topic}"
        job = _Job(self.config, self.context, self.context.get("broker"), subscriber.group_id,
                   self.config.handler(scope, record.topic), record)
        try:
            outcome, result = await job.decide(call_next, msg)
        except _Unrunnable as exc:
            return await self._refuse(str(exc), msg)
        except BaseException as exc:
            # Not decided (a transient failure, a cancelled task): read the record again.
            with contextlib.suppress(Exception):
                await msg.nack()
            if isinstance(exc, Exception):
                # Transient (a database or broker failure), or one no retry of the record has fixed
                # so far (a dead-letter topic that refuses it): either way, after a growing pause.
                pause = self.config._transient_pause()
                kind = "transient failure" if is_transient(exc) else "failure"
                log.warning("%s: %s (%s: %s); reading the record again in %.1f s", record.where(), kind,
                            type(exc).__name__, exc, pause)
                await asyncio.sleep(pause)
            raise
        self.config._transient_failures = 0
        # The decision is committed: now the offset.
        await msg.ack()
        if outcome is not Outcome.APPLIED:
            # Not handled now: no result for FastStream to publish or reply with.
            raise SkipMessage
        return result

    async def after_processed(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> bool | None:
        if self._reached or exc_val is None or isinstance(exc_val, IgnoredException | SubscriberNotFound):
            return False
        # The record failed before it reached this middleware's scope: FastStream could not parse it,
        # or a middleware outside this one failed. Either way nobody will ack it, and the next ack
        # would commit past it: dead-letter it or read it again.
        subscriber = self.context.get("handler_")
        raw = self.msg
        if subscriber is None or _misconfiguration(subscriber, raw) is not None or not hasattr(raw, "offset"):
            return False
        try:
            record = to_message(raw)
        except ConfigurationError:
            return False
        consumer = getattr(raw, "consumer", None) or subscriber.consumer
        problem = _header_problem(raw)
        try:
            if problem is None:
                raise exc_val
            scope = self.config.scope or f"{subscriber.group_id}:{record.topic}"
            job = _Job(self.config, self.context, self.context.get("broker"), subscriber.group_id,
                       self.config.handler(scope, record.topic), record)
            await job.dead_letter(None, UnparsableRecord(f"{record.where()}: FastStream cannot parse the record: "
                                                         f"{problem}"), attempts=0)
        except Exception as exc:
            consumer.seek(_topic_partition(record), record.offset)
            pause = self.config._transient_pause()
            log.warning("%s: failed before the subscriber (%s: %s); reading the record again in %.1f s",
                        record.where(), type(exc).__name__, exc, pause)
            await asyncio.sleep(pause)
            return False
        self.config._transient_failures = 0
        await consumer.commit()
        return False

    # -- helpers --------------------------------------------------------------

    async def _refuse(self, problem: str, msg: Any) -> Any:
        """Stop the subscriber, leaving ``msg`` to be read again once the service is fixed."""
        with contextlib.suppress(Exception):
            await msg.nack()
        subscriber = self.context.get("handler_")
        log.error("exactlyonce refuses FastStream subscriber %s and stops it: %s",
                  getattr(subscriber, "topic_names", subscriber), problem)
        raise StopConsume from ConfigurationError(problem)


class _Unrunnable(Exception):
    """The subscriber cannot be called at all (an error in its definition): no record's fault."""


def _is_definition_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the subscriber is defined wrongly (pydantic cannot build its arguments' model)."""
    try:
        from pydantic import PydanticUserError
    except ImportError:  # pragma: no cover - FastStream depends on pydantic
        return False
    return isinstance(exc, PydanticUserError)


def _header_problem(record: Any) -> str | None:
    """Which header of ``record`` FastStream cannot parse (it decodes every value as UTF-8), or ``None``."""
    for name, data in record.headers or ():
        if data is None:
            return f"header {name!r} has a null value"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"header {name!r} is not UTF-8 ({exc})"
    return None


def _topic_partition(record: Message) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(record.topic, record.partition)


def _misconfiguration(subscriber: Any, raw: Any) -> str | None:
    """Why ``subscriber`` cannot run effectively-once, or ``None``."""
    if isinstance(raw, tuple | list):
        return "a batch subscriber (batch=True) is not supported: subscribe one record at a time"
    policy = getattr(subscriber, "ack_policy", None)
    if policy is not AckPolicy.MANUAL:
        return (f"the subscriber's ack_policy is {policy!s}: declare it with ack_policy=AckPolicy.MANUAL, "
                "exactlyonce commits the offset after the database commit")
    if not getattr(subscriber, "group_id", None):
        return "the subscriber has no group_id: exactlyonce commits offsets to a consumer group"
    return None


class _Job:
    """The decision about one record: claim and handle it, or skip it, or dead-letter it."""

    def __init__(self, config: ExactlyOnce, context: Any, broker: Any, group_id: str, handler: Handler,
                 record: Message) -> None:
        self.config = config
        self.context = context
        self.broker = broker
        self.group_id = group_id
        self.handler = handler
        self.record = record

    async def decide(self, call_next: _CallNext, msg: Any) -> tuple[Outcome, Any]:
        """Decide the record and commit the decision; raise only what should make it be read again."""
        try:
            message_id = ids.resolve(self.config.message_id, self.record)
        except MessageError as exc:
            return await self.dead_letter(None, exc, attempts=0), None
        retry = self.config.retry
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._apply(call_next, msg, message_id)
            except Skip as signal:
                log.info("%s: subscriber skipped %r: %s", self.record.where(), message_id, signal.reason)
                return await self._record_skip(message_id), None
            except FingerprintMismatch as exc:
                if self.config.on_fingerprint_mismatch is OnMismatch.SKIP:
                    log.warning("%s; skipped as a duplicate", exc)
                    return await self._book(Outcome.FINGERPRINT_MISMATCH, Outcome.DUPLICATE), None
                return await self.dead_letter(message_id, exc, attempts=0), None
            except (DeadLetter, MessageError) as exc:
                return await self.dead_letter(message_id, exc, attempts), None
            except Exception as exc:
                if is_transient(exc):
                    raise
                if _is_definition_error(exc):
                    raise _Unrunnable(f"the subscriber cannot be called: {type(exc).__name__}: {exc}") from exc
                if attempts < retry.attempts and isinstance(exc, retry.retry_on) and is_handler_failure(exc):
                    await asyncio.sleep(_backoff(retry, attempts))
                    continue
                log.error("%s: subscriber for %s failed after %d attempt(s): %s: %s", self.record.where(),
                          self.handler.scope, attempts, type(exc).__name__, exc)
                return await self.dead_letter(message_id, exc, attempts), None

    async def _apply(self, call_next: _CallNext, msg: Any, message_id: str) -> tuple[Outcome, Any]:
        """Claim the record and run the subscriber in ONE transaction; commit it."""
        scope, record = self.handler.scope, self.record
        async with self.config._sessions() as session, session.begin():
            assert isinstance(session, _HandlerSession)
            claimed = await session.run_sync(lambda s: claim(s, scope, message_id, record))
            if claimed is Claim.DUPLICATE:
                stored = (await session.run_sync(lambda s: stored_fingerprints(s, scope, [message_id]))).get(message_id)
                if stored is not None and stored != record.fingerprint():
                    raise FingerprintMismatch(
                        f"{record.where()}: message ID {message_id!r} was processed before with a different "
                        f"payload (sha256 {stored[:12]}…, now {record.fingerprint()[:12]}…)"
                    )
                await session.run_sync(lambda s: self._count(s, Outcome.DUPLICATE))
                log.debug("%s: duplicate %r skipped", record.where(), message_id)
                return Outcome.DUPLICATE, None
            root = session.sync_session.get_transaction()
            with contextlib.ExitStack() as stack:
                for key, value in ((SESSION_CONTEXT, session), (MESSAGE_CONTEXT, record),
                                   (MESSAGE_ID_CONTEXT, message_id)):
                    stack.enter_context(self.context.scope(key, value))
                session.lent = True
                try:
                    result = await call_next(msg)
                finally:
                    session.lent = False
            if session.sync_session.get_transaction() is not root or root is None or not root.is_active:
                raise ConfigurationError(
                    "the subscriber ended the transaction that holds the record's dedup row (through the "
                    "connection or the transaction object); it must write through the session and return"
                )
            await session.run_sync(lambda s: self._count(s, Outcome.APPLIED))
        return Outcome.APPLIED, result

    def _count(self, session: SyncSession, *outcomes: Outcome) -> None:
        tally = Tally()
        for outcome in outcomes:
            tally.add(self.record, outcome)
        count(session, self.group_id, self.handler.scope, tally)

    async def _book(self, *outcomes: Outcome) -> Outcome:
        async with self.config._sessions() as session, session.begin():
            await session.run_sync(lambda s: self._count(s, *outcomes))
        return outcomes[-1]

    async def _record_skip(self, message_id: str) -> Outcome:
        scope, record = self.handler.scope, self.record
        async with self.config._sessions() as session, session.begin():
            claimed = await session.run_sync(
                lambda s: claim(s, scope, message_id, record, outcome=Outcome.SKIPPED))
            outcome = Outcome.SKIPPED if claimed is Claim.NEW else Outcome.DUPLICATE
            await session.run_sync(lambda s: self._count(s, outcome))
        return outcome

    async def dead_letter(self, message_id: str | None, exc: BaseException, attempts: int) -> Outcome:
        """Dead-letter the record in a transaction that records it in the dedup table, as exactlyonce's workers do.

        A record without a usable ID, or whose ID belongs to another payload,
        is recorded under its coordinates, so that its redelivery is not
        dead-lettered twice. The dead letter is published inside the
        transaction: if the broker does not acknowledge it, nothing is
        recorded and the record is read again.
        """
        record = self.record
        coordinates = deadletter.coordinates_id(record)
        record_id = coordinates if message_id is None or isinstance(exc, FingerprintMismatch) else message_id
        try:
            return await self._dead_letter_as(message_id, exc, attempts, record_id)
        except Exception as failure:
            if is_transient(failure) or record_id == coordinates:
                raise
            log.warning("%s: cannot record the dead letter under message ID %r (%s); recording it under its "
                        "coordinates", record.where(), message_id, failure)
            return await self._dead_letter_as(message_id, exc, attempts, coordinates)

    async def _dead_letter_as(self, message_id: str | None, exc: BaseException, attempts: int,
                              record_id: str) -> Outcome:
        scope, record = self.handler.scope, self.record
        async with self.config._sessions() as session, session.begin():
            booked = [Outcome.FINGERPRINT_MISMATCH] if isinstance(exc, FingerprintMismatch) else []
            claimed = await session.run_sync(
                lambda s: claim(s, scope, record_id, record, outcome=Outcome.DEAD_LETTERED))
            outcome = Outcome.DUPLICATE if claimed is Claim.DUPLICATE else Outcome.DEAD_LETTERED
            if outcome is Outcome.DEAD_LETTERED:
                await self._publish(message_id, exc, attempts)
            await session.run_sync(lambda s: self._count(s, *booked, outcome))
        if outcome is Outcome.DEAD_LETTERED:
            log.error("%s: dead-lettered to %s (%s: %s)", record.where(), self.handler.dead_letter_topic,
                      reason_of(exc), exc)
        return outcome

    async def _publish(self, message_id: str | None, exc: BaseException, attempts: int) -> None:
        """Send the dead letter through the broker's publisher and wait for the broker's acknowledgement."""
        from aiokafka.errors import MessageSizeTooLargeError

        record, topic = self.record, self.handler.dead_letter_topic
        ours = deadletter.headers(self.handler, record, message_id, exc, attempts)
        try:
            await self._send(topic, record.key, record.value, [*record.headers, *ours])
        except MessageSizeTooLargeError as refused:
            key, value, bounded = deadletter.bounded_copy(record, ours)
            log.warning("%s: %s; dead-lettering a bounded copy (value cut to %d of %d bytes)", record.where(),
                        refused, len(value or b""), len(record.value or b""))
            try:
                await self._send(topic, key, value, bounded)
            except MessageSizeTooLargeError as again:
                raise ConfigurationError(
                    f"dead-letter topic {topic!r} refuses even a bounded dead letter of "
                    f"{deadletter.size(key, value, bounded)} bytes: raise its max.message.bytes ({again})"
                ) from again

    async def _send(self, topic: str, key: bytes | None, value: bytes | None,
                    all_headers: Sequence[tuple[str, bytes]]) -> None:
        if self.broker is None:
            raise ConfigurationError("no FastStream broker in the context to publish the dead letter with")
        headers, omitted = _text_headers(all_headers)
        if omitted:
            headers[deadletter.HEADER_PREFIX + "headers-omitted"] = str(omitted)
        await self.broker.publish(value, topic=topic, key=key, headers=headers)


def _text_headers(all_headers: Sequence[tuple[str, bytes]]) -> tuple[dict[str, str], int]:
    """Headers as FastStream publishes them (one text value per name), and how many could not be carried.

    A header value that is not UTF-8 cannot be; of a repeated name, the last
    value is kept (the one :meth:`Message.header` and the ID strategies read).
    """
    kept: dict[str, str] = {}
    omitted = 0
    for name, data in all_headers:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            omitted += 1
            continue
        if name in kept:
            omitted += 1
        kept[name] = text
    return kept, omitted


def _backoff(retry: Retry, attempt: int) -> float:
    """The wait after failed attempt ``attempt``: as :meth:`Retry.retrying` waits (exponential, jittered)."""
    base = retry.backoff.total_seconds()
    wait = min(retry.max_backoff.total_seconds(), base * 2.0 ** (attempt - 1))
    return wait + random.uniform(0, base)

