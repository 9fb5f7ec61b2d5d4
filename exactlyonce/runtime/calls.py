"""What every path does with a record before and around its handler: admit it, derive its ID, call.

A record is *admitted* before anything is claimed: a forged or unsigned one
(with signing keys), one larger than ``max_value_bytes``, or, for a handler
with ``model=``, one whose value is not JSON or does not validate, is refused
with a :class:`~exactlyonce.errors.MessageError` and dead-lettered without a
claim. Admission returns the message with its typed payload, which the ID
strategy, ``sequence`` and the handler then read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from exactlyonce import _session, ids, payload, signing
from exactlyonce.errors import MessageError, OversizedValue
from exactlyonce.message import Message
from exactlyonce.metrics import Metrics

if TYPE_CHECKING:
    from exactlyonce.handler import Handler

T = TypeVar("T")


class Calls:
    """Admission, derivation and handler calls, with the App's signing keys and metrics."""

    def __init__(self, signing_keys: Mapping[str, bytes] | None, metrics: Metrics) -> None:
        self._signing_keys = signing_keys
        self._metrics = metrics

    def admit(self, handler: Handler, message: Message) -> Message:
        """Refuse a record before anything is claimed (forged or unsigned, too large, an invalid payload).

        Returns ``message`` with its typed payload when the handler has
        ``model=``. The checks run in this order, so a forged record never
        reaches the model's validators, nor an oversized one the JSON decoder.
        """
        if self._signing_keys is not None:
            signing.verify(message, self._signing_keys)
        if handler.max_value_bytes is not None and len(message.value or b"") > handler.max_value_bytes:
            raise OversizedValue(
                f"{message.where()}: value has {len(message.value or b'')} bytes, "
                f"more than max_value_bytes={handler.max_value_bytes}"
            )
        return self.typed(handler, message)

    def typed(self, handler: Handler, message: Message) -> Message:
        """``message`` with its typed payload (``handler.model``); as it is when it has one or needs none.

        Raises :class:`~exactlyonce.errors.MessageDecodeError` or
        :class:`~exactlyonce.errors.InvalidPayload`. Records parked by a
        sequenced handler come back from the database without their payload:
        they are typed again when released.
        """
        if handler.model is None or message.payload is not None:
            return message
        return payload.typed(handler.model, message)

    def derive(self, derive: Callable[[Message], T], message: Message) -> T:
        """``derive(message)``: the message ID or sequence; with signing on, from the signed parts only.

        A verified signature vouches for the ``message-id`` header, the key and
        the value, nothing else: an ID or number read from another header would
        let a forged copy of a genuine record claim another message's place.
        """
        if self._signing_keys is None:
            return derive(message)
        try:
            return derive(signing.signed_parts(message))
        except MessageError as exc:
            if not _succeeds(derive, message):
                raise
            # It works on the whole record: it reads what the signature does not cover.
            raise type(exc)(
                f"{exc} (with signing_keys, message IDs and sequence numbers may only come from what the "
                f"signature covers: the {ids.DEFAULT_HEADER!r} header, the key and the value)"
            ) from exc

    def call(self, handler: Handler, arg: Any, session: _session.HandlerSession) -> None:
        """Call the handler once (a record, or a batch's list), timing the call alone."""
        started = time.monotonic()
        _session.call(handler.func, arg, session, handler.scope, is_async=handler.is_async)
        self._metrics.handler_seconds(handler.scope, time.monotonic() - started)

    def count_retries(self, handler: Handler, attempts: int) -> None:
        """Count the handler retries among ``attempts`` calls of one record."""
        for _ in range(attempts - 1):
            self._metrics.retry(handler.scope, "handler")


def _succeeds(fn: Callable[[Message], Any], message: Message) -> bool:
    try:
        fn(message)
    except Exception:
        return False
    return True
