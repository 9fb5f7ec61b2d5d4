"""Handlers deduplicated by message ID: claim, handle, and bisect on failure.

A chunk of up to ``batch_size`` records is claimed and handled in ONE
transaction: the dedup rows go in first (the unique index decides who owns
each message before any effect is written), then the handler runs for the new
ones, then the outcomes are counted, then the commit. A handler failure rolls
the whole chunk back and it is retried in halves, which isolates a failing
record in O(log n) transactions without a savepoint per record; that record
then gets its retry policy and, if it keeps failing, its dead letter. Earlier
halves commit first, so each partition's order is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from exactlyonce import ids
from exactlyonce.errors import DeadLetter, FingerprintMismatch, MessageError, Skip, TransientError
from exactlyonce.handler import OnMismatch
from exactlyonce.message import Message
from exactlyonce.outcome import Outcome
from exactlyonce.runtime.booking import Bookkeeper, fields, log_failure, log_skip
from exactlyonce.runtime.calls import Calls
from exactlyonce.runtime.deadletter import DeadLetters
from exactlyonce.runtime.transient import (
    Transient,
    conflicts_allowed,
    is_handler_failure,
    is_transient,
)
from exactlyonce.storage import engine as _db
from exactlyonce.storage.store import Claim, claim, claim_many, stored_fingerprints

if TYPE_CHECKING:
    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

_Item = tuple[Message, str]

#: Transactions committed in a row at a conflict-reduced size before it grows again.
GROW_AFTER = 8
#: A transaction that loses a lock conflict is retried, and followed, in
#: pieces of this fraction of its size.
SHRINK_BY = 8
#: How long conflicts are remembered: after one, the size grows back only to
#: below the size that lost; after two within this time of each other, it is
#: held; once this much time has passed since the last one, it grows back.
CEILING_S = 30.0


class _Conflicts(NamedTuple):
    ceiling: int
    last: float
    losses: int


class Dedup:
    """The path of handlers without ``sequence=``."""

    def __init__(self, books: Bookkeeper, transient: Transient, dead_letters: DeadLetters, calls: Calls,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._books = books
        self._transient = transient
        self._dead_letters = dead_letters
        self._calls = calls
        self._clock = clock
        #: Records per transaction per scope, where a lock conflict made it less than ``batch_size``.
        self._sizes: dict[str, int] = {}
        #: Transactions committed in a row at that size, per scope.
        self._streaks: dict[str, int] = {}
        #: Per scope, while conflicts are recent: the smallest size in force that lost, when the
        #: last transaction lost, and how many lost within CEILING_S of the one before.
        self._conflicts: dict[str, _Conflicts] = {}

    def chunk_size(self, handler: Handler) -> int:
        """How many records to put in the next transaction of ``handler``.

        ``batch_size``, until a transaction of several records loses a lock
        conflict (a deadlock or serialization failure): then an eighth
        (:data:`SHRINK_BY`) of the size in force, at once and without
        retrying the same size, so that the next transactions hold fewer row
        locks for less time. (The size in force, not the lost transaction's
        length: a poll's last few records that lose a chance conflict do not
        cut a large batch size down to one.) A handler whose records lock
        rows in different orders deadlocks with other workers at any size
        above one; each deadlock stalls every worker queued on those rows
        until the database's deadlock check (PostgreSQL's
        ``deadlock_timeout``, 1 s by default), so probing upwards is what
        costs. After one conflict, every :data:`GROW_AFTER` transactions
        committed in a row at the reduced size grow it by an eighth (at
        least one record), to below the size that lost. A second conflict
        within :data:`CEILING_S` seconds of the last one is contention, not
        chance: the size is cut again and held. Once :data:`CEILING_S`
        seconds pass without a transaction of several records losing, it
        grows back towards ``batch_size``.
        """
        return self._sizes.get(handler.scope, handler.batch_size)

    def _shrink(self, handler: Handler) -> None:
        """A transaction of several records lost a lock conflict at the size in force."""
        size, now = self.chunk_size(handler), self._clock()
        recent = self._recent(handler.scope, now)
        self._conflicts[handler.scope] = (
            _Conflicts(min(recent.ceiling, size), now, recent.losses + 1) if recent else _Conflicts(size, now, 1))
        self._sizes[handler.scope] = max(1, size // SHRINK_BY)
        self._streaks[handler.scope] = 0

    def _recent(self, scope: str, now: float) -> _Conflicts | None:
        """The scope's conflicts if the last one is less than CEILING_S old (older ones are forgotten)."""
        conflicts = self._conflicts.get(scope)
        if conflicts is not None and now - conflicts.last >= CEILING_S:
            del self._conflicts[scope]
            return None
        return conflicts

    def _grow(self, handler: Handler, committed: int) -> None:
        size = self._sizes.get(handler.scope)
        if size is None or committed < size:
            return
        streak = self._streaks[handler.scope] = self._streaks.get(handler.scope, 0) + 1
        if streak < GROW_AFTER:
            return
        self._streaks[handler.scope] = 0
        limit = handler.batch_size
        recent = self._recent(handler.scope, self._clock())
        if recent is not None:
            if recent.losses > 1:
                return  # contention: hold the size until the conflicts are CEILING_S old
            limit = min(limit, recent.ceiling - 1)
        size = min(size + max(1, size // 8), max(limit, size))
        if size >= handler.batch_size:
            del self._sizes[handler.scope]
        else:
            self._sizes[handler.scope] = size

    def process(self, handler: Handler, messages: list[Message]) -> None:
        """Decide ``messages`` (each partition's in order) and commit every decision.

        Records that cannot be handled (bad signature, oversized, an
        invalid payload, no usable ID) are dead-lettered one by one; the others are claimed and
        handled together.
        """
        good: list[_Item] = []
        strategy = handler.message_id or ids.header()
        for message in messages:
            try:
                message = self._calls.admit(handler, message)
                good.append((message, self._calls.derive(lambda m: ids.resolve(strategy, m), message)))
            except MessageError as exc:
                self._dead_letters.refuse(handler, message, exc)
        if good:
            self._run(handler, good)

    def _run(self, handler: Handler, items: list[_Item]) -> None:
        """Apply ``items`` in one transaction; on a handler failure in halves, on a lock conflict in smaller pieces."""
        if len(items) == 1:
            message, message_id = items[0]
            self._transient.safe(handler.scope, message, lambda: self._handle(handler, message, message_id))
            self._grow(handler, 1)
            return
        bounded = self._books.bounds_lock_waits(handler, len(items))
        lost: TransientError | None = None
        failed = False
        try:
            # A lock conflict is not retried at this size: see chunk_size.
            results = self._transient.safe(handler.scope, items[0][0], lambda: self._apply(handler, items),
                                           retry_on=conflicts_allowed(0, lock_waits=bounded))
        except TransientError as exc:
            if not _db.is_conflict(exc, lock_waits=bounded):
                raise
            lost = exc
        except Exception as exc:
            log.info("a batch of %d failed (%s: %s); splitting it", len(items), type(exc).__name__, exc)
            failed = True
        # Redone outside the except clauses: an error in the smaller transactions must not carry
        # the lost batch's error as its __context__ (a handler's own error would look transient).
        if lost is not None:
            self._transient.back_off_conflict(handler.scope, len(items), lost)
            self._shrink(handler)
            self._in_pieces(handler, items)
            return
        if failed:
            self._halves(handler, items)
            return
        self._grow(handler, len(items))
        for (message, message_id), result in zip(items, results, strict=True):
            if isinstance(result, FingerprintMismatch):
                self._mismatch_safely(handler, message, message_id, result)

    def _mismatch_safely(self, handler: Handler, message: Message, message_id: str, exc: FingerprintMismatch) -> None:
        self._transient.safe(handler.scope, message, lambda: self._mismatch(handler, message, message_id, exc))

    def _in_pieces(self, handler: Handler, items: list[_Item]) -> None:
        """Apply ``items`` in consecutive transactions of the (shrunk, regrowing) chunk size."""
        start = 0
        while start < len(items):
            piece = items[start : start + self.chunk_size(handler)]
            start += len(piece)
            self._run(handler, piece)

    def _halves(self, handler: Handler, items: list[_Item]) -> None:
        middle = len(items) // 2
        self._run(handler, items[:middle])
        self._run(handler, items[middle:])

    def _handle(self, handler: Handler, message: Message, message_id: str) -> Outcome:
        """One record on its own: apply it with retries, or skip or dead-letter it."""
        attempts = 0

        def attempt() -> Outcome:
            nonlocal attempts
            attempts += 1
            (result,) = self._apply(handler, [(message, message_id)])
            if isinstance(result, FingerprintMismatch):
                raise result
            return result

        try:
            return handler.retry.retrying(retryable=is_handler_failure, sleep=self._transient.sleep)(attempt)
        except Skip as signal:
            self._calls.count_retries(handler, attempts)
            log_skip(handler, message, message_id, signal)
            return self._record_skip(handler, message, message_id)
        except FingerprintMismatch as exc:
            self._calls.count_retries(handler, attempts)
            return self._mismatch(handler, message, message_id, exc)
        except (DeadLetter, MessageError) as exc:
            self._calls.count_retries(handler, attempts)
            return self._dead_letters.dead_letter(handler, message, message_id, exc, attempts)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._calls.count_retries(handler, attempts)
            log_failure(handler, message, message_id, attempts, exc)
            return self._dead_letters.dead_letter(handler, message, message_id, exc, attempts)

    def _apply(self, handler: Handler, items: list[_Item]) -> list[Outcome | FingerprintMismatch]:
        """Claim and handle ``items`` in ONE transaction; return their outcomes.

        Raises whatever the handler raised (the transaction rolls back: no
        effect and no dedup row is kept). A record whose ID is known with
        another payload gets a :class:`FingerprintMismatch` as its outcome,
        for the caller to handle after the commit.
        """
        results: list[Outcome | FingerprintMismatch] = []
        with self._books.transaction(handler, len(items)) as (session, book):
            # A repeated ID within the batch is claimed once, by its first occurrence.
            first: dict[str, int] = {}
            for index, (_, message_id) in enumerate(items):
                first.setdefault(message_id, index)
            new = claim_many(session, handler.scope, [(items[i][1], items[i][0]) for i in first.values()])
            known = stored_fingerprints(session, handler.scope, {mid for _, mid in items if mid not in new})
            fresh: list[Message] = []
            for index, (message, message_id) in enumerate(items):
                if message_id in new and first[message_id] == index:
                    fresh.append(message)
                    results.append(Outcome.APPLIED)
                    continue
                stored = known.get(message_id) or items[first[message_id]][0].fingerprint()
                if stored == message.fingerprint():
                    results.append(Outcome.DUPLICATE)
                else:
                    results.append(FingerprintMismatch(
                        f"{message.where()}: message ID {message_id!r} was processed before with a "
                        f"different payload (sha256 {stored[:12]}…, now {message.fingerprint()[:12]}…)"
                    ))
            if fresh:
                if handler.batch:
                    self._calls.call(handler, fresh, session)
                else:
                    for message in fresh:
                        self._calls.call(handler, message, session)
            for (message, message_id), result in zip(items, results, strict=True):
                if isinstance(result, Outcome):
                    book.add(message, result, message_id)
        return results

    def _mismatch(self, handler: Handler, message: Message, message_id: str, exc: FingerprintMismatch) -> Outcome:
        if handler.on_fingerprint_mismatch is OnMismatch.SKIP:
            log.warning("%s; skipped as a duplicate", exc,
                        extra=fields(handler, message, message_id, Outcome.DUPLICATE, reason=exc.reason))
            with self._books.transaction(handler) as (_, book):
                book.add(message, Outcome.FINGERPRINT_MISMATCH, message_id)
                return book.add(message, Outcome.DUPLICATE, message_id)
        return self._dead_letters.dead_letter(handler, message, message_id, exc, attempts=0)

    def _record_skip(self, handler: Handler, message: Message, message_id: str) -> Outcome:
        with self._books.transaction(handler) as (session, book):
            claimed = claim(session, handler.scope, message_id, message, outcome=Outcome.SKIPPED)
            return book.add(message, Outcome.SKIPPED if claimed is Claim.NEW else Outcome.DUPLICATE, message_id)
