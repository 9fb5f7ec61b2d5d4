"""Booking outcomes: one call per record, counted in four places.

Every transaction that decides records opens a :class:`Book` with
:meth:`Bookkeeper.transaction` and books each decision with one call,
:meth:`Book.add`. The book is written to ``exactlyonce_counters`` inside the
transaction (so a rolled-back decision is never counted and a committed one
always is), and reported to the runner's ``stats``, the
``exactlyonce_messages_total`` metric and the log only after the commit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exactlyonce import _session
from exactlyonce.errors import Skip
from exactlyonce.message import Message
from exactlyonce.metrics import Metrics
from exactlyonce.outcome import Outcome
from exactlyonce.storage import engine as _db
from exactlyonce.storage import store
from exactlyonce.storage.store import Tally

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

#: Distinct dead-letter reasons counted in ``Runner.stats``; more are counted as "other".
MAX_REASONS = 50


@dataclass(slots=True)
class Entry:
    """One booked decision: a record, its outcome, and what the log line says about it."""

    message: Message
    outcome: Outcome
    message_id: str | None
    #: Why a record was dead-lettered (its ``reason`` is the dead letter's).
    error: BaseException | None
    fields: dict[str, Any] = field(default_factory=dict)


class Book:
    """The outcomes one transaction decides for one handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.entries: list[Entry] = []

    def add(
        self, message: Message, outcome: Outcome, message_id: str | None = None, *,
        error: BaseException | None = None, **fields: Any,
    ) -> Outcome:
        """Book ``outcome`` for ``message``; ``fields`` go into the decision's log line. Returns ``outcome``."""
        if outcome.__class__ is not Outcome:
            outcome = Outcome(outcome)
        self.entries.append(Entry(message, outcome, message_id, error, fields))
        return outcome

    def write(self, session: Session, group_id: str) -> None:
        """Add the book to ``exactlyonce_counters`` in ``session``'s transaction."""
        tally = Tally()
        for entry in self.entries:
            tally.add(entry.message, entry.outcome)
        store.count(session, group_id, self.handler.scope, tally)


#: Told each committed decision, after the counters, stats, metrics and log (the test kit's seam).
Observer = Callable[["Handler", Entry], None]


class Bookkeeper:
    """Opens booked transactions, and reports the books that committed.

    ``engine`` serves the sync handlers, ``async_engine`` the ``async def``
    ones (each ``None`` when the App has no such handler): every transaction
    of a handler, its dead letters' too, is on its handler's engine. An async
    engine is used through its ``sync_engine`` by the same code, under
    ``greenlet_spawn`` on the worker's event loop (see ``Runner.run``).

    ``observer``, if given, is called with each committed decision, in order,
    after it is counted and logged (:class:`exactlyonce.testing.TestApp`
    reads every record's outcome this way).
    """

    def __init__(
        self, engine: Engine | None, group_id: str, stats: Counter[str], metrics: Metrics,
        async_engine: AsyncEngine | None = None, *, observer: Observer | None = None,
        batch_lock_timeout: timedelta | None = None,
    ) -> None:
        self._engine = engine
        self._batch_lock_timeout = batch_lock_timeout
        self._async_engine = async_engine
        self._group_id = group_id
        self.stats = stats
        self._metrics = metrics
        self._observer = observer

    def engine_for(self, handler: Handler) -> Engine:
        """The (sync) engine of ``handler``'s transactions: an async engine's ``sync_engine`` for an async one."""
        if handler.is_async:
            if self._async_engine is None:  # pragma: no cover - the Runner passes one when it has async handlers
                raise RuntimeError(f"no async engine for the async handler of {handler.scope}")
            return self._async_engine.sync_engine
        if self._engine is None:  # pragma: no cover - the Runner passes one when it has sync handlers
            raise RuntimeError(f"no engine for the handler of {handler.scope}")
        return self._engine

    def bounds_lock_waits(self, handler: Handler, records: int) -> bool:
        """Whether a transaction of ``records`` of ``handler`` waits at most ``batch_lock_timeout`` for a lock.

        Then a lock wait timeout in it is a lost conflict, not a transient
        failure (:func:`~exactlyonce.storage.engine.bound_lock_wait`): on
        PostgreSQL, for more than one record, when the bound is set.
        """
        return (records > 1 and self._batch_lock_timeout is not None
                and self.engine_for(handler).dialect.name == "postgresql")

    def engines(self) -> list[Engine]:
        """Every engine the transactions use."""
        engines = [self._engine, self._async_engine.sync_engine if self._async_engine is not None else None]
        return [engine for engine in engines if engine is not None]

    @contextlib.contextmanager
    def transaction(self, handler: Handler, records: int = 1) -> Iterator[tuple[_session.HandlerSession, Book]]:
        """A transaction and its book: written before the commit, reported after it.

        With ``records`` > 1 (a transaction the caller can redo in smaller
        ones), its lock waits are bounded by ``batch_lock_timeout`` where
        :meth:`bounds_lock_waits`.

        The session is a :class:`~exactlyonce._session.HandlerSession`: it may
        be lent to the handler, which cannot end the transaction. An async
        handler's also has the ``AsyncSession`` it is given
        (:attr:`~exactlyonce._session.HandlerSession.async_view`).
        """
        book = Book(handler)
        if handler.is_async and self._async_engine is not None:
            session = _session.HandlerSession.for_async(self._async_engine)
        else:
            session = _session.HandlerSession(self.engine_for(handler))
        with session, session.begin():
            if self._batch_lock_timeout is not None and self.bounds_lock_waits(handler, records):
                _db.bound_lock_wait(session, self._batch_lock_timeout)
            yield session, book
            book.write(session, self._group_id)
        self.report(book)

    def report(self, book: Book) -> None:
        """Count a committed book in ``stats`` and the metrics, and log its decisions."""
        handler = book.handler
        # Counted once per outcome, not per record (a batch is mostly one outcome).
        for outcome, count in collections.Counter(str(entry.outcome) for entry in book.entries).items():
            self.stats[outcome] += count
            self._metrics.outcome(handler.scope, outcome, count)
        debug = log.isEnabledFor(logging.DEBUG)
        for entry in book.entries:
            if entry.outcome is Outcome.DEAD_LETTERED and entry.error is not None:
                self._dead_lettered(handler, entry.message, entry.error)
            elif debug:
                log.debug("%s: %s %r", entry.message.where(), entry.outcome, entry.message_id,
                          extra=fields(handler, entry.message, entry.message_id, entry.outcome, **entry.fields))
            if self._observer is not None:
                self._observer(handler, entry)

    def _dead_lettered(self, handler: Handler, message: Message, exc: BaseException) -> None:
        reason = reason_of(exc)
        # A DeadLetter's reason is the handler's free text: count at most
        # MAX_REASONS distinct ones, the rest as "other".
        counted = reason
        known = sum(1 for key in self.stats if key.startswith("dead_lettered:"))
        if f"dead_lettered:{reason}" not in self.stats and known >= MAX_REASONS:
            counted = "other"
        self.stats[f"dead_lettered:{counted}"] += 1
        log.error("%s: dead-lettered to %s (%s: %s)", message.where(), handler.dead_letter_topic, reason, exc,
                  extra=fields(handler, message, None, Outcome.DEAD_LETTERED, reason=reason))


def reason_of(exc: BaseException) -> str:
    """The dead-letter reason of ``exc``: its ``reason``, or ``handler-error``."""
    return getattr(exc, "reason", None) or "handler-error"


def fields(handler: Handler, message: Message, message_id: str | None, outcome: str, **more: Any) -> dict[str, Any]:
    """The structured fields of a log line about one record (``exactlyonce run --log-format json``)."""
    found = {"scope": handler.scope, "topic": message.topic, "partition": message.partition,
             "offset": message.offset, "outcome": str(outcome), **more}
    if message_id is not None:
        found["message_id"] = message_id
    return found


def log_skip(handler: Handler, message: Message, message_id: str, signal: Skip) -> None:
    log.info("%s: handler skipped %r: %s", message.where(), message_id, signal.reason,
             extra=fields(handler, message, message_id, Outcome.SKIPPED, reason=signal.reason))


def log_failure(handler: Handler, message: Message, message_id: str, attempts: int, exc: BaseException) -> None:
    log.error("%s: handler for %s failed after %d attempt(s): %s: %s", message.where(), handler.scope, attempts,
              type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG),
              extra=fields(handler, message, message_id, "failed"))
