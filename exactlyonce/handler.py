"""Handler: a registered handler function, the settings it runs with, and their checks at registration.

:meth:`App.handler <exactlyonce.App.handler>` documents each setting and
calls :func:`check_registration`; the runtime reads :class:`Handler`.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from exactlyonce import ids, payload, settings, signing
from exactlyonce.errors import ConfigurationError
from exactlyonce.retry import Retry
from exactlyonce.storage.schema import MAX_SCOPE_LENGTH

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "Handler",
    "HandlerFunc",
    "OnGap",
    "OnMismatch",
    "SequenceFunc",
    "check_registration",
    "is_coroutine_function",
]

#: ``func(message, session)``, or ``func(messages, session)`` for a batch handler;
#: an ``async def`` one gets an ``AsyncSession`` and is awaited.
HandlerFunc = Callable[[Any, Session], Any] | Callable[[Any, "AsyncSession"], Awaitable[Any]]

#: ``sequence(message) -> (stream, number)`` for a sequenced handler.
SequenceFunc = Callable[[Any], tuple[str, int]]


class OnMismatch(enum.StrEnum):
    """What to do when a known message ID arrives with a different payload."""

    #: Dead-letter the new record with reason ``fingerprint-mismatch`` (default).
    DEAD_LETTER = "dead_letter"
    #: Skip it like a duplicate, with a warning and a counter.
    SKIP = "skip"


class OnGap(enum.StrEnum):
    """What a sequenced handler does when a stream's gap stays open past ``gap_timeout``."""

    #: Report it (log and metric) and keep the parked messages waiting (default).
    WAIT = "wait"
    #: Report it and dead-letter the parked messages (reason ``sequence-gap``);
    #: the stream still waits for the missing number.
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True, kw_only=True)
class Handler:
    """A registered handler and the settings it runs with.

    :meth:`App.handler` creates it, with every default filled in; ``App.handlers``
    maps each topic to its ``Handler``.
    """

    #: The topic the handler consumes.
    topic: str
    #: The registered function: ``func(message, session)``, or ``func(messages, session)`` for a batch handler.
    func: HandlerFunc
    #: ``None`` only for a sequenced handler: then the ``message-id`` header is
    #: used where there is one, else ``"<stream>#<number>"`` (for dead letters).
    message_id: ids.MessageIdStrategy | None
    #: The dedup namespace: the same message ID in two scopes is two messages.
    scope: str
    #: Where the records this handler cannot handle go (default ``"<topic>.dlq"``).
    dead_letter_topic: str
    #: How a failing handler is retried before its record is dead-lettered.
    retry: Retry
    #: Records with a larger value are dead-lettered unread (``None``: no limit).
    max_value_bytes: int | None
    #: What a known message ID with a different payload gets.
    on_fingerprint_mismatch: OnMismatch
    #: ``func(messages, session)`` with a list of new messages instead of one.
    batch: bool
    #: Records claimed and handled per database transaction.
    batch_size: int
    #: Per-stream in-order delivery instead of per-ID dedup (``None``: ID dedup).
    sequence: SequenceFunc | None = None
    #: How long a stream may wait for a missing number before it is reported.
    gap_timeout: timedelta = timedelta(minutes=5)
    #: What a gap open longer than ``gap_timeout`` does to the parked messages.
    on_gap: OnGap = OnGap.WAIT
    #: The class each record's value is validated into, once, before its claim
    #: (a pydantic v2 model or a dataclass); the handler, the message ID
    #: strategy and ``sequence`` read it as ``message.payload``. ``None``: raw bytes only.
    model: type[Any] | None = None
    #: An ``async def`` handler: awaited on the worker's event loop with an
    #: :class:`~sqlalchemy.ext.asyncio.AsyncSession` (docs/handlers.md, "Async handlers").
    is_async: bool = False


#: Records per transaction of an ordinary (``def handler(message, session)``) handler.
DEFAULT_MESSAGE_BATCH_SIZE = 100
#: Records per transaction of a batch handler: kafka-python's ``max_poll_records``,
#: so that by default a whole poll is one claim statement and one commit.
DEFAULT_BATCH_SIZE = 500


def check_registration(
    topic: str,
    *,
    group_id: str,
    registered: Iterable[Handler],
    verifies_signatures: bool,
    message_id: ids.MessageIdStrategy | None = None,
    name: str | None = None,
    dead_letter_topic: str | None = None,
    retry: Retry | None = None,
    max_value_bytes: int | None = None,
    on_fingerprint_mismatch: OnMismatch | str = OnMismatch.DEAD_LETTER,
    batch: bool = False,
    batch_size: int | None = None,
    sequence: SequenceFunc | None = None,
    gap_timeout: timedelta = timedelta(minutes=5),
    on_gap: OnGap | str = OnGap.WAIT,
    model: type[Any] | None = None,
) -> Callable[[HandlerFunc], Handler]:
    """Check a registration's settings now; return ``make(func) -> Handler``, which checks the function.

    The settings are those of :meth:`App.handler <exactlyonce.App.handler>`.
    ``registered``: the app's handlers so far (a topic and a scope are taken
    once). ``verifies_signatures``: the app has ``signing_keys``, so a
    message ID must come from what the signature covers. Any problem is a
    ``ConfigurationError``.
    """
    dead_letter_topic = dead_letter_topic or f"{topic}.dlq"
    for value in (topic, dead_letter_topic):
        settings.check_topic(value)
    registered = list(registered)
    if any(h.topic == topic for h in registered):
        raise ConfigurationError(f"a handler for topic {topic!r} is already registered")
    if retry is not None and not isinstance(retry, Retry):
        raise ConfigurationError("retry must be an exactlyonce.Retry")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE if batch else DEFAULT_MESSAGE_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError("batch_size must be an integer of at least 1")
    if max_value_bytes is not None and max_value_bytes < 1:
        raise ConfigurationError("max_value_bytes must be positive")
    try:
        mismatch = OnMismatch(on_fingerprint_mismatch)
    except ValueError as exc:
        raise ConfigurationError(f"on_fingerprint_mismatch must be one of "
                                 f"{[m.value for m in OnMismatch]}") from exc
    try:
        gap_policy = OnGap(on_gap)
    except ValueError as exc:
        raise ConfigurationError(f"on_gap must be one of {[g.value for g in OnGap]}") from exc
    if sequence is not None:
        if not callable(sequence):
            raise ConfigurationError("sequence must be a callable Message -> (stream, number)")
        if batch:
            raise ConfigurationError("a sequenced handler cannot be a batch handler (batch=True)")
    if verifies_signatures and message_id is not None:
        _check_signed_id(message_id)
    if gap_timeout <= timedelta(0):
        raise ConfigurationError("gap_timeout must be positive")
    _check_model(model, message_id)
    scope = _check_scope(name if name is not None else f"{group_id}:{topic}", registered)

    def make(func: HandlerFunc) -> Handler:
        if not callable(func):
            raise ConfigurationError("handler must be callable")
        is_async = is_coroutine_function(func)
        return Handler(
            topic=topic,
            func=func,
            message_id=message_id or (None if sequence is not None else ids.header()),
            scope=scope,
            dead_letter_topic=dead_letter_topic,
            retry=retry or Retry(),
            max_value_bytes=max_value_bytes,
            on_fingerprint_mismatch=mismatch,
            batch=batch,
            batch_size=batch_size,
            sequence=sequence,
            gap_timeout=gap_timeout,
            on_gap=gap_policy,
            model=model,
            is_async=is_async,
        )

    return make


def _check_model(model: Any, message_id: ids.MessageIdStrategy | None) -> None:
    """A usable ``model=``; an ``ids.field`` strategy only with a model that has the field."""
    if model is not None:
        payload.check_model(model)
    path = ids.field_path(message_id) if message_id is not None else None
    if path is not None:
        if model is None:
            raise ConfigurationError(
                f"message_id=ids.field({path!r}) reads the typed payload, and this handler has no model=: "
                f"give model=..., or read the JSON value with ids.json_field({path!r})"
            )
        payload.check_path(model, path)


def _check_scope(scope: str, registered: list[Handler]) -> str:
    """``scope``, if it is storable and not taken."""
    if not scope or len(scope) > MAX_SCOPE_LENGTH:
        raise ConfigurationError(
            f"handler scope {scope!r} must have 1 to {MAX_SCOPE_LENGTH} characters"
        )
    if any(h.scope == scope for h in registered):
        raise ConfigurationError(f"scope {scope!r} is already used by another handler")
    return scope


def _check_signed_id(message_id: ids.MessageIdStrategy) -> None:
    """With signing keys, refuse an ID strategy that reads a header the signature does not cover."""
    name_read = ids.header_name(message_id)
    if name_read is not None and name_read not in signing.SIGNED_HEADERS:
        # A forged copy could carry any value there and still verify.
        raise ConfigurationError(
            f"message_id=ids.header({name_read!r}) reads a header the signature does not cover; with "
            f"signing_keys, take the ID from the {ids.DEFAULT_HEADER!r} header (the default), the key "
            "(ids.key()) or the value (ids.json_field(...))"
        )


def is_coroutine_function(func: Callable[..., Any]) -> bool:
    """Whether calling ``func`` returns a coroutine to await: an ``async def`` handler.

    Looks through ``functools.partial`` and at a callable object's
    ``__call__``. Refuses (``ConfigurationError``) a function whose body would
    not run when it is called or awaited: a generator function or an async
    generator function. A sync wrapper around an ``async def`` function
    (``functools.wraps``) is a sync handler here: if it returns a coroutine,
    the runner stops with a ConfigurationError (register the ``async def``
    itself).
    """
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target).__call__  # a callable object: what calling it runs
    name = getattr(func, "__qualname__", None) or repr(func)
    if inspect.isasyncgenfunction(target):
        raise ConfigurationError(
            f"handler {name} is an async generator function: calling it only creates an async generator, "
            "none of its body would run. Register async def handler(message, session) that does its work "
            "before it returns"
        )
    if inspect.isgeneratorfunction(target):
        raise ConfigurationError(
            f"handler {name} is a generator function: calling it runs none of its body. "
            "Register a plain def handler(message, session) that does its work before it returns"
        )
    return inspect.iscoroutinefunction(target)
