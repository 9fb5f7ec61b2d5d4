"""Every exception exactlyonce raises, grouped by how the caller should react.

::

    ExactlyOnceError
    ├── ConfigurationError     fix the settings and start again
    ├── MessageError           permanent: this message can never be handled as it is
    │   ├── MessageDecodeError     the value is not what the handler or ID strategy needs
    │   ├── InvalidPayload         the value is JSON, but not what the handler's model= accepts
    │   ├── InvalidMessageId       missing, empty, non-text or over-long message ID
    │   ├── OversizedValue         the value is larger than the handler accepts
    │   ├── FingerprintMismatch    a known message ID arrived with a different payload
    │   ├── BadSequence            a sequenced handler's stream/number is missing or malformed
    │   │   └── InvalidStream          the stream key is text the database cannot store exactly
    │   ├── SequenceGap            parked behind a gap that stayed open too long (gap policy)
    │   └── BadSignature           unsigned, unknown key, or a signature that does not match
    ├── TransientError         retry later: the database or broker is unavailable
    └── HandlerSignal          control flow a handler raises on purpose
        ├── Skip                   record the message as handled, keep none of its writes
        └── DeadLetter             dead-letter the message now, without retrying

Exceptions from SQLAlchemy and kafka-python are translated at the boundary
(``raise ... from exc``) so callers never need to import either library to
react to a failure.
"""

from __future__ import annotations


class ExactlyOnceError(Exception):
    """Base class of every exactlyonce exception."""


class ConfigurationError(ExactlyOnceError):
    """The application is configured wrongly (missing URL, duplicate handler, async handler, ...).

    Also raised inside a handler that tries to end the runner's transaction
    (``session.commit()``, ``rollback()``, ``close()``): that handler fails.
    """


class MessageError(ExactlyOnceError):
    """A message that cannot be handled as it is; retrying will not help.

    The runner dead-letters such a message instead of retrying it.
    """

    #: Short machine-readable reason, written to the dead-letter headers.
    reason = "bad-message"


class MessageDecodeError(MessageError):
    """The message value could not be decoded (for example, it is not valid JSON)."""

    reason = "undecodable-value"


class InvalidPayload(MessageError):
    """The value is JSON but does not validate as the handler's ``model=`` (a pydantic model or a dataclass).

    The message says which fields failed and why, never the values they had.
    """

    reason = "invalid-payload"


class InvalidMessageId(MessageError):
    """The message ID strategy produced no usable ID.

    Missing, empty, too long, not encodable as UTF-8, with a control
    character, or starting with the reserved ``@``.
    """

    reason = "invalid-message-id"


class OversizedValue(MessageError):
    """The record value exceeds the handler's ``max_value_bytes``."""

    reason = "oversized-value"


class FingerprintMismatch(MessageError):
    """A message ID seen before arrived with a different payload.

    A re-send of the same transfer with a different amount must not be skipped
    as a duplicate: by default it is dead-lettered with this reason.
    """

    reason = "fingerprint-mismatch"


class BadSequence(MessageError):
    """A sequenced handler's ``sequence`` callable gave no usable (stream, number)."""

    reason = "bad-sequence"


class InvalidStream(BadSequence):
    """A sequenced handler's stream key is text the database cannot store exactly.

    Longer than 255 characters, not encodable as UTF-8 (a lone surrogate), or
    with a control character (see :func:`exactlyonce.ids.text_problem`).
    """

    reason = "invalid-stream"


class SequenceGap(MessageError):
    """A parked message whose stream's gap stayed open past ``gap_timeout``.

    Raised for the parked messages only under the ``on_gap="dead_letter"`` policy.
    """

    reason = "sequence-gap"


class BadSignature(MessageError):
    """The message is unsigned, signed with an unknown key, or its signature does not match.

    Such a message is dead-lettered before it is claimed: it never reaches the
    handler or the dedup table, so a forged message cannot pre-claim a real ID.
    """

    reason = "bad-signature"


class TransientError(ExactlyOnceError):
    """A dependency (database or broker) failed in a way that may pass; retry later."""


class HandlerSignal(ExactlyOnceError):
    """Base of the exceptions a handler raises to choose an outcome explicitly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        #: Why; written to the log, and for :class:`DeadLetter` to its headers.
        self.reason = reason


class Skip(HandlerSignal):
    """Raise in a handler to record the message as handled without effects.

    The handler's writes are rolled back; the dedup row is kept with outcome
    ``skipped``, so a redelivery is skipped too.
    """


class DeadLetter(HandlerSignal):
    """Raise in a handler to dead-letter the message now, without retries.

    ``reason`` becomes the ``x-exactlyonce-reason`` header.
    """
