"""Sequenced handlers (``sequence=``): each stream's records handled 1, 2, 3, ... once, in order.

Per record, in the transaction that locks its stream: a number at or below
the stream's watermark is a duplicate; the next number is handled, the
watermark advances, and the parked successors it unblocks are handled after
it; a later number is parked (see :mod:`exactlyonce.sequence` for the store).

Every step is bounded: a transaction releases at most ``batch_size`` parked
records (a stream whose next number is still parked then is *ready*, and is
continued between polls, by any worker of the group should this one die), and
giving up a gap (``on_gap="dead_letter"``) dead-letters at most ``batch_size``
records per transaction. After a lock conflict, every one of these bounds is
the smaller size in force (:mod:`exactlyonce.runtime.sizing`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from exactlyonce import _session, ids
from exactlyonce._duration import format_duration
from exactlyonce.errors import (
    BadSequence,
    DeadLetter,
    FingerprintMismatch,
    MessageError,
    SequenceGap,
    Skip,
    TransientError,
)
from exactlyonce.handler import OnGap, OnMismatch
from exactlyonce.message import Message
from exactlyonce.metrics import Metrics
from exactlyonce.outcome import Outcome
from exactlyonce.runtime.booking import Book, Bookkeeper, fields, log_failure, log_skip
from exactlyonce.runtime.calls import Calls
from exactlyonce.runtime.deadletter import DeadLetters
from exactlyonce.runtime.sizing import ConflictSizing
from exactlyonce.runtime.transient import (
    Transient,
    is_handler_failure,
    is_transient,
    transient_unless_conflict,
)
from exactlyonce.settings import utcnow
from exactlyonce.storage import engine as _db
from exactlyonce.storage import sequence as seq

if TYPE_CHECKING:
    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

#: How often, at most, a runner looks for sequence gaps older than their timeout.
MAX_GAP_CHECK_INTERVAL_S = 30.0

#: (message, message ID, stream, number)
_Item = tuple[Message, str, str, int]


class Ordered:
    """The path of handlers with ``sequence=``, and their work between polls."""

    def __init__(
        self, handlers: list[Handler], books: Bookkeeper, transient: Transient,
        dead_letters: DeadLetters, calls: Calls, metrics: Metrics, sizing: ConflictSizing,
    ) -> None:
        self._handlers = handlers
        self._books = books
        self._transient = transient
        self._dead_letters = dead_letters
        self._calls = calls
        self._metrics = metrics
        self._sizing = sizing
        self._next_gap_check = 0.0
        #: A bounded step stopped with more to do: continue right after the next poll (which then does not wait).
        self.more_work = False
        #: (scope, stream, gap_since) of the gaps already logged, to log each once.
        self._reported_gaps: set[tuple[str, str, Any]] = set()

    # -- records of a poll ----------------------------------------------------

    def process(self, handler: Handler, messages: list[Message]) -> None:
        """Decide ``messages`` (each partition's in order) and commit every decision."""
        items: list[_Item] = []
        for message in messages:
            try:
                message = self._calls.admit(handler, message)
                message_id, stream, number = self._calls.derive(lambda m: _sequence_and_id(handler, m), message)
                items.append((message, message_id, stream, number))
            except MessageError as exc:
                self._dead_letters.refuse(handler, message, exc)
        if items:
            self._run(handler, items)

    def _run(self, handler: Handler, items: list[_Item]) -> None:
        """Apply ``items`` in one transaction; after a lock conflict, in smaller ones (see ConflictSizing)."""
        if len(items) == 1:
            self._transient.safe(handler.scope, items[0][0], lambda: self._apply(handler, items))
            self._sizing.committed(handler, 1)
            return
        bounded = self._books.bounds_lock_waits(handler, len(items))
        try:
            self._transient.safe(handler.scope, items[0][0], lambda: self._apply(handler, items),
                                 retry_on=transient_unless_conflict(lock_waits=bounded))
        except TransientError as exc:
            if not _db.is_conflict(exc, lock_waits=bounded):
                raise
            lost = exc
        else:
            self._sizing.committed(handler, len(items))
            return
        # Redone outside the except clause (see Dedup._run), in order: each piece commits before the next.
        self._transient.back_off_conflict(handler.scope, len(items), lost)
        for piece in self._sizing.after_loss(handler, items):
            self._run(handler, piece)

    def _apply(self, handler: Handler, items: list[_Item]) -> None:
        """Handle ``items`` in ONE transaction, each stream in number order.

        A record whose handler keeps failing is dead-lettered and its number
        counts as handled, so the stream moves on. Dead letters are sent
        inside the transaction: if it rolls back, they may be sent again (at
        least once), never lost.
        """
        scope = handler.scope
        #: Parked records this transaction may still release (see _release): after a lock
        #: conflict no more than it takes polled records, so that it stays small too.
        budget = self._sizing.size(handler)
        with self._books.transaction(handler, len(items)) as (session, book):
            now = utcnow()
            streams = seq.lock(session, scope, (name for _, _, name, _ in items), now)
            for message, message_id, name, number in items:
                stream = streams[name]
                where: dict[str, Any] = {"stream": name, "number": number}
                if number <= stream.watermark:
                    book.add(message, Outcome.DUPLICATE, message_id, **where)
                elif number > stream.watermark + 1:
                    stored = seq.park(session, scope, name, number, message_id, message, now)
                    if stored is None:
                        stream.parked += 1
                        stream.gap_since = stream.gap_since or now
                        book.add(message, Outcome.PARKED, message_id, **where)
                    elif stored == message.fingerprint():
                        book.add(message, Outcome.DUPLICATE, message_id, **where)
                    else:
                        self._mismatch(handler, book, message, message_id, name, number)
                else:
                    stored = seq.parked_fingerprint(session, scope, name, number) if stream.parked else None
                    if stored is None:
                        self._call_in_order(handler, session, book, message, message_id, **where)
                        stream.watermark = number
                        stream.gap_since = None  # the gap, if any, moves on: its clock restarts
                    elif stored == message.fingerprint():
                        # Parked already, by a release cut short: released below.
                        book.add(message, Outcome.DUPLICATE, message_id, **where)
                    else:
                        self._mismatch(handler, book, message, message_id, name, number)
                    budget -= self._release(handler, session, book, stream, budget, now)
            seq.save(session, scope, streams.values(), now)

    def _release(
        self, handler: Handler, session: _session.HandlerSession, book: Book, stream: seq.Stream, budget: int,
        now: datetime,
    ) -> int:
        """Handle the parked successors of ``stream``'s watermark, at most ``budget``; return how many.

        A gap filled after a long wait may have unblocked any number of
        parked records; one transaction takes a bounded share, so that its
        locks, its memory and its time stay bounded. When the budget runs out
        with the next number parked, the stream is *ready*: its gap clock is
        stopped and :meth:`release_ready` continues (on this worker right
        away, or on any worker of the group after a crash).
        """
        released = 0
        while stream.parked and released < budget:
            taken = seq.take(session, handler.scope, stream.stream, stream.watermark + 1)
            if taken is None:
                break
            parked_id, parked_message = taken
            stream.parked -= 1
            stream.watermark += 1
            released += 1
            self._call_in_order(handler, session, book, parked_message, parked_id,
                                stream=stream.stream, number=stream.watermark)
        if not stream.parked:
            stream.gap_since = None
        elif released >= budget and seq.parked_fingerprint(
            session, handler.scope, stream.stream, stream.watermark + 1
        ) is not None:
            stream.gap_since = None
            self.more_work = True
        elif released or stream.gap_since is None:
            stream.gap_since = now
        return released

    def _mismatch(self, handler: Handler, book: Book, message: Message, message_id: str, stream: str,
                  number: int) -> None:
        exc = FingerprintMismatch(
            f"{message.where()}: number {number} of stream {stream!r} is parked with a different payload"
        )
        book.add(message, Outcome.FINGERPRINT_MISMATCH, message_id, stream=stream, number=number)
        if handler.on_fingerprint_mismatch is OnMismatch.SKIP:
            log.warning("%s; skipped as a duplicate", exc,
                        extra=fields(handler, message, message_id, Outcome.DUPLICATE, reason=exc.reason))
            book.add(message, Outcome.DUPLICATE, message_id, stream=stream, number=number)
            return
        self._dead_letters.publish(handler, message, message_id, exc, attempts=0)
        book.add(message, Outcome.DEAD_LETTERED, message_id, error=exc)

    def _call_in_order(
        self, handler: Handler, session: _session.HandlerSession, book: Book, message: Message, message_id: str,
        **where: Any,
    ) -> None:
        """Run the handler for one record in a savepoint, with its retry policy; book the outcome.

        A failed attempt rolls back to the savepoint only, keeping what the
        transaction did for the records before it.
        """
        try:
            # A parked record comes back from the database without its typed payload.
            message = self._calls.typed(handler, message)
        except MessageError as exc:
            self._dead_letters.publish(handler, message, message_id, exc, attempts=0)
            book.add(message, Outcome.DEAD_LETTERED, message_id, error=exc)
            return
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            # If the database rolled back the whole transaction under the
            # savepoint (a deadlock on InnoDB), this raises TransientError:
            # the whole transaction is retried, never continued.
            with _db.savepoint(session):
                self._calls.call(handler, message, session)

        try:
            handler.retry.retrying(retryable=is_handler_failure, sleep=self._transient.sleep)(attempt)
            book.add(message, Outcome.APPLIED, message_id, **where)
        except Skip as signal:
            log_skip(handler, message, message_id, signal)
            book.add(message, Outcome.SKIPPED, message_id, **where)
        except Exception as exc:
            if is_transient(exc):
                raise
            if not isinstance(exc, DeadLetter | MessageError):
                log_failure(handler, message, message_id, attempts, exc)
            self._dead_letters.publish(handler, message, message_id, exc, attempts)
            book.add(message, Outcome.DEAD_LETTERED, message_id, error=exc)
        self._calls.count_retries(handler, attempts)

    # -- between polls ----------------------------------------------------------

    def between_polls(self) -> None:
        """Continue cut-short releases, report old gaps and apply the gap policy.

        Runs every ``gap_timeout / 4`` (at most every 30 s), and after every
        poll while a bounded step left more to do. Each step is one bounded
        transaction per handler, so polls (and the group's liveness) go on
        between steps.
        """
        if not self._handlers:
            return
        if not self.more_work and time.monotonic() < self._next_gap_check:
            return
        interval = min(min(h.gap_timeout.total_seconds() for h in self._handlers) / 4, MAX_GAP_CHECK_INTERVAL_S)
        self._next_gap_check = time.monotonic() + max(interval, 0.2)
        self.more_work = False
        more = False
        for handler in self._handlers:
            try:
                more = self.release_ready(handler) or more
                more = self.handle_gaps(handler) or more
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("sequence work for %s failed, trying again later: %s", handler.scope, exc)
        self.more_work = self.more_work or more

    def release_ready(self, handler: Handler) -> bool:
        """Continue releases cut short, in ONE transaction of at most ``batch_size`` records (fewer after a conflict).

        Returns whether more may be ready.
        """
        scope = handler.scope
        budget = self._sizing.size(handler)
        with self._books.transaction(handler) as (session, book):
            names = seq.ready(session, scope, limit=budget)
            if not names:
                return False
            now = utcnow()
            streams = seq.lock(session, scope, names, now)
            for stream in streams.values():
                if budget <= 0:
                    break
                budget -= self._release(handler, session, book, stream, budget, now)
            seq.save(session, scope, streams.values(), now)
        return budget <= 0

    def handle_gaps(self, handler: Handler) -> bool:
        """Report or give up the gaps older than ``gap_timeout``; return whether more are left to give up."""
        scope = handler.scope
        now = utcnow()
        cutoff = now - handler.gap_timeout
        if handler.on_gap is OnGap.WAIT:
            with Session(self._books.engine_for(handler)) as session:
                late = seq.overdue(session, scope, cutoff)
            self._metrics.open_gaps(scope, len(late))
            self._report_gaps(handler, late)
            return False
        # Give up: dead-letter the parked records, at most batch_size (fewer after a lock
        # conflict) in one transaction (it holds the streams' locks while it publishes them).
        budget = self._sizing.size(handler)
        with self._books.transaction(handler) as (session, book):
            late = seq.overdue(session, scope, cutoff, lock_rows=True, limit=budget)
            for stream in late:
                if budget <= 0:
                    break
                taken = seq.take_first(session, scope, stream.stream, budget)
                for number, message_id, message in taken:
                    exc = SequenceGap(
                        f"stream {stream.stream!r} of {scope} waited for number {stream.watermark + 1} "
                        f"since {stream.gap_since} UTC, longer than gap_timeout "
                        f"{format_duration(handler.gap_timeout)}: "
                        f"parked number {number} dead-lettered"
                    )
                    self._dead_letters.publish(handler, message, message_id, exc, attempts=0)
                    book.add(message, Outcome.DEAD_LETTERED, message_id, error=exc)
                if len(taken) < budget:
                    stream.parked = 0  # all of them
                else:
                    stream.parked = max(stream.parked - len(taken), 1)
                budget -= len(taken)
                if not stream.parked:
                    stream.gap_since = None
            seq.save(session, scope, late, now)
        self._metrics.open_gaps(scope, sum(1 for stream in late if stream.parked))
        return budget <= 0

    def _report_gaps(self, handler: Handler, late: Any) -> None:
        """Log each open gap once; remember only the gaps still open, so the set stays as small as they are."""
        scope = handler.scope
        open_now = {(scope, stream.stream, stream.gap_since) for stream in late}
        reported = {gap for gap in self._reported_gaps if gap[0] == scope}
        self._reported_gaps = (self._reported_gaps - reported) | open_now
        for stream in late:
            if (scope, stream.stream, stream.gap_since) not in reported:
                log.warning(
                    "%s: stream %r has waited for number %d since %s UTC (gap_timeout %s); "
                    "%d message(s) parked behind it, waiting",
                    scope, stream.stream, stream.watermark + 1, stream.gap_since, format_duration(handler.gap_timeout),
                    stream.parked, extra={"scope": scope, "stream": stream.stream,
                                          "number": stream.watermark + 1, "outcome": "gap"},
                )


def _sequence_and_id(handler: Handler, message: Message) -> tuple[str, str, int]:
    stream, number = seq.parse(_sequence_of(handler, message), message)
    return _sequenced_id(handler, message, stream, number), stream, number


def _sequence_of(handler: Handler, message: Message) -> Any:
    assert handler.sequence is not None
    try:
        return handler.sequence(message)
    except MessageError:
        raise
    except Exception as exc:
        raise BadSequence(f"{message.where()}: sequence raised {type(exc).__name__}: {exc}") from exc


def _sequenced_id(handler: Handler, message: Message, stream: str, number: int) -> str:
    """The ID named in dead letters and parked rows (dedup is by number, not by ID)."""
    if handler.message_id is not None:
        return ids.resolve(handler.message_id, message)
    try:
        return ids.resolve(ids.header(), message)
    except MessageError:
        fallback = f"{stream}#{number}"
        if len(fallback) <= ids.MAX_MESSAGE_ID_LENGTH:
            return fallback
        return "#" + hashlib.sha256(fallback.encode()).hexdigest()
