"""Dead letters: the record format (built here, parsed here for the admin commands), and sending them.

A dead letter is the original record (key, value, headers) published to the
handler's dead-letter topic with ``x-exactlyonce-*`` headers that say why and
from where. It is published *inside* the transaction that records the
decision: if the broker does not acknowledge it, the decision rolls back and
the offset does not advance (so a dead letter is sent at least once, never
lost). A record too large to be copied whole is sent as a bounded copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import ids
from exactlyonce._kafka import RecordProducer, RecordTooLarge
from exactlyonce.errors import BadSignature, FingerprintMismatch, MessageError
from exactlyonce.logs import redact
from exactlyonce.message import Message
from exactlyonce.outcome import Outcome
from exactlyonce.runtime.booking import Bookkeeper, fields, reason_of
from exactlyonce.runtime.transient import Transient, is_transient
from exactlyonce.storage.store import Claim, claim

if TYPE_CHECKING:
    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

#: Header names added to a dead-lettered record (the original headers are kept).
HEADER_PREFIX = "x-exactlyonce-"

#: A dead letter too large for its topic is sent as a bounded copy instead: the
#: value's first bytes, and the original key and headers only if this small.
BOUNDED_VALUE_BYTES = 1024
BOUNDED_KEY_BYTES = 1024
BOUNDED_HEADERS_BYTES = 8192


# -- the format ---------------------------------------------------------------


def headers(
    handler: Handler, message: Message, message_id: str | None, exc: BaseException, attempts: int
) -> list[tuple[str, bytes]]:
    """The ``x-exactlyonce-*`` headers of ``message``'s dead letter (to follow its own headers)."""
    return [
        (HEADER_PREFIX + name, value.encode("utf-8", "backslashreplace"))
        for name, value in (
            ("reason", reason_of(exc)),
            ("error-type", type(exc).__name__),
            ("error-message", error_message(exc)),
            ("topic", message.topic),
            ("partition", str(message.partition)),
            ("offset", str(message.offset)),
            # A forged record's ID is not to be trusted: not even as a label.
            ("message-id", "" if isinstance(exc, BadSignature) else message_id or ""),
            ("attempts", str(attempts)),
            ("scope", handler.scope),
        )
    ]


def split_headers(
    all_headers: Iterable[tuple[str, bytes | None]],
) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A dead letter's headers: (the original record's headers, the ``x-exactlyonce-*`` ones by name).

    The names of the second lose their prefix (``reason``, ``topic``, ...).
    """
    original: list[tuple[str, bytes]] = []
    meta: dict[str, str] = {}
    for name, value in all_headers:
        if name.startswith(HEADER_PREFIX):
            meta[name[len(HEADER_PREFIX):]] = (value or b"").decode("utf-8", "replace")
        else:
            original.append((name, value or b""))
    return original, meta


def error_message(exc: BaseException) -> str:
    """The ``error-message`` header: the exception's text, secrets redacted, no SQL parameters, 1000 characters."""
    if isinstance(exc, sa.exc.StatementError):
        # str() would append "[parameters: ...]": the values the handler
        # wrote, personal data or secrets among them.
        parts = [f"({detail})" for detail in exc.detail]
        parts.append(str(exc.args[0]) if exc.args else type(exc).__name__)
        if exc.statement:
            parts.append(f"[SQL: {exc.statement}]")
        if exc.params:
            parts.append("[SQL parameters left out]")
        text = "\n".join(parts)
    else:
        text = str(exc)
    return redact(text)[:1000]


def coordinates_id(message: Message) -> str:
    """The ID a record is recorded under when its own cannot be: ``@topic/partition/offset``."""
    # The prefix is refused in message IDs (ids.resolve): no sender can forge these.
    coordinates = f"{ids.RESERVED_PREFIX}{message.topic}/{message.partition}/{message.offset}"
    if len(coordinates) <= ids.MAX_MESSAGE_ID_LENGTH:
        return coordinates
    return ids.RESERVED_PREFIX + hashlib.sha256(coordinates.encode()).hexdigest()


def bounded_copy(
    message: Message, ours: Sequence[tuple[str, bytes]]
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter of bounded size: the value's first bytes, the key and headers only if small, marked.

    ``x-exactlyonce-value-truncated`` holds the original value's length (a
    replay skips such a record: its value is not the message); the key and
    the original headers, when dropped, are counted in
    ``x-exactlyonce-key-omitted`` / ``x-exactlyonce-headers-omitted``.
    """
    value = None if message.value is None else message.value[:BOUNDED_VALUE_BYTES]
    marks = [("value-truncated", str(len(message.value or b"")))]
    key = message.key
    if key is not None and len(key) > BOUNDED_KEY_BYTES:
        key = None
        marks.append(("key-omitted", str(len(message.key or b""))))
    kept = list(message.headers)
    if size(None, None, kept) > BOUNDED_HEADERS_BYTES:
        kept = []
        marks.append(("headers-omitted", str(len(message.headers))))
    bounded = [*kept, *((name, data[:1000]) for name, data in ours)]
    bounded += [(HEADER_PREFIX + name, text.encode("utf-8")) for name, text in marks]
    return key, value, bounded


def size(key: bytes | None, value: bytes | None, all_headers: Sequence[tuple[str, bytes]]) -> int:
    """A record's size as a producer counts it, near enough: key, value, header names and values."""
    named = sum(len(name.encode("utf-8")) + len(data) for name, data in all_headers)
    return len(key or b"") + len(value or b"") + named


# -- sending ------------------------------------------------------------------


class _Unclaimable(Exception):
    """A dead letter's message ID could not be claimed (never escapes: its coordinates are claimed instead)."""


class DeadLetters:
    """Sends dead letters (one producer, renewed after a failure) and records them as decisions."""

    def __init__(
        self, books: Bookkeeper, transient: Transient, producer_factory: Callable[[], RecordProducer]
    ) -> None:
        self._books = books
        self._transient = transient
        self._producer_factory = producer_factory
        self._producer: RecordProducer | None = None

    def refuse(self, handler: Handler, message: Message, exc: MessageError) -> Outcome:
        """Dead-letter a record refused before its claim (no usable ID, forged, oversized)."""
        return self._transient.safe(
            handler.scope, message, lambda: self.dead_letter(handler, message, None, exc, attempts=0)
        )

    def dead_letter(
        self, handler: Handler, message: Message, message_id: str | None, exc: BaseException, attempts: int
    ) -> Outcome:
        """Dead-letter ``message`` in a transaction of its own, recorded in the dedup table.

        A record without a usable ID, or whose ID belongs to another payload,
        is recorded under its coordinates, so that a redelivery of the same
        record is not dead-lettered twice. A record with a bad signature is
        not recorded at all: its ID is not to be trusted, and a forged record
        must not claim the ID of a genuine one.
        """
        if message_id is None or isinstance(exc, FingerprintMismatch):
            return self._dead_letter_as(handler, message, message_id, exc, attempts, coordinates_id(message))
        try:
            return self._dead_letter_as(handler, message, message_id, exc, attempts, message_id)
        except _Unclaimable as failure:
            # The ID itself cannot be stored (whatever slipped past ids.resolve):
            # claiming it again would fail again and stop the worker. The
            # coordinates always can be.
            log.warning("%s: cannot record the dead letter under message ID %r (%s); "
                        "recording it under its coordinates", message.where(), message_id, failure.__cause__,
                        extra=fields(handler, message, None, Outcome.DEAD_LETTERED))
            return self._dead_letter_as(handler, message, message_id, exc, attempts, coordinates_id(message))

    def _dead_letter_as(
        self, handler: Handler, message: Message, message_id: str | None, exc: BaseException, attempts: int,
        record_id: str,
    ) -> Outcome:
        with self._books.transaction(handler) as (session, book):
            if isinstance(exc, FingerprintMismatch):
                book.add(message, Outcome.FINGERPRINT_MISMATCH, message_id)
            if not isinstance(exc, BadSignature) and _claim(session, handler, message, record_id) is Claim.DUPLICATE:
                return book.add(message, Outcome.DUPLICATE, message_id)
            # Publish inside the transaction: if the broker does not acknowledge,
            # the dead-letter row rolls back and the offset does not advance.
            self.publish(handler, message, message_id, exc, attempts)
            return book.add(message, Outcome.DEAD_LETTERED, message_id, error=exc)

    def publish(
        self, handler: Handler, message: Message, message_id: str | None, exc: BaseException, attempts: int
    ) -> None:
        """Send ``message`` to the handler's dead-letter topic, with why; wait for the broker's ACK."""
        ours = headers(handler, message, message_id, exc, attempts)
        try:
            self._send(handler.dead_letter_topic, message.key, message.value, [*message.headers, *ours])
        except RecordTooLarge as refused:
            # The copy is larger than the original (the headers above): a record
            # near the topic's size limit would be refused forever. Send a bounded
            # copy, marked as cut, so the partition moves on; if even that is
            # refused, the topic's limit is the problem: the error stops the worker.
            key, value, bounded = bounded_copy(message, ours)
            log.warning("%s: %s; dead-lettering a bounded copy (value cut to %d of %d bytes)", message.where(),
                        refused, len(value or b""), len(message.value or b""),
                        extra=fields(handler, message, message_id, Outcome.DEAD_LETTERED))
            try:
                self._send(handler.dead_letter_topic, key, value, bounded)
            except RecordTooLarge as again:
                raise RecordTooLarge(
                    f"dead-letter topic {handler.dead_letter_topic!r} refuses even a bounded dead letter of "
                    f"{size(key, value, bounded)} bytes: raise its max.message.bytes ({again})"
                ) from again

    def _send(self, topic: str, key: bytes | None, value: bytes | None, all_headers: list[tuple[str, bytes]]) -> None:
        """Publish one dead letter and wait for the broker's ACK.

        After a failure the next publish gets a new producer: kafka-python's
        idempotent producer refuses every later record once one was refused
        (too large, say), and a new one also starts with fresh connections.
        """
        try:
            if self._producer is None:
                self._producer = self._producer_factory()
            self._producer.publish(topic, key=key, value=value, headers=all_headers)
        except Exception:
            producer, self._producer = self._producer, None
            if producer is not None:
                with contextlib.suppress(Exception):
                    producer.close(0.0)
            raise

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def _claim(session: Session, handler: Handler, message: Message, record_id: str) -> Claim:
    try:
        return claim(session, handler.scope, record_id, message, outcome=Outcome.DEAD_LETTERED)
    except Exception as failure:
        if is_transient(failure) or record_id == coordinates_id(message):
            raise
        raise _Unclaimable(record_id) from failure

