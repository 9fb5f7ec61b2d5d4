"""Handlers deduplicated by message ID: claim, handle, and bisect on failure.

A chunk of up to ``batch_size`` records (fewer for a while after a lock
conflict: :mod:`exactlyonce.runtime.sizing`) is claimed and handled in ONE
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
from typing import TYPE_CHECKING

from exactlyonce import ids
from exactlyonce.errors import DeadLetter, FingerprintMismatch, MessageError, Skip, TransientError
from exactlyonce.handler import OnMismatch
from exactlyonce.message import Message
from exactlyonce.outcome import Outcome
from exactlyonce.runtime.booking import Bookkeeper, fields, log_failure, log_skip
from exactlyonce.runtime.calls import Calls
from exactlyonce.runtime.deadletter import DeadLetters
from exactlyonce.runtime.sizing import ConflictSizing
from exactlyonce.runtime.transient import (
    Transient,
    is_handler_failure,
    is_transient,
    transient_unless_conflict,
)
from exactlyonce.storage import engine as _db
from exactlyonce.storage.store import Claim, claim, claim_many, stored_fingerprints

if TYPE_CHECKING:
    from exactlyonce.handler import Handler

log = logging.getLogger("exactlyonce")

_Item = tuple[Message, str]


class Dedup:
    """The path of handlers without ``sequence=``."""

    def __init__(self, books: Bookkeeper, transient: Transient, dead_letters: DeadLetters, calls: Calls,
                 sizing: ConflictSizing) -> None:
        self._books = books
        self._transient = transient
        self._dead_letters = dead_letters
        self._calls = calls
        self._sizing = sizing

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
            self._sizing.committed(handler, 1)
            return
        bounded = self._books.bounds_lock_waits(handler, len(items))
        lost: TransientError | None = None
        failed = False
        try:
            # A lock conflict is not retried at this size: see ConflictSizing.
            results = self._transient.safe(handler.scope, items[0][0], lambda: self._apply(handler, items),
                                           retry_on=transient_unless_conflict(lock_waits=bounded))
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
            for piece in self._sizing.after_loss(handler, items):
                self._run(handler, piece)
            return
        if failed:
            self._halves(handler, items)
            return
        self._sizing.committed(handler, len(items))
        for (message, message_id), result in zip(items, results, strict=True):
            if isinstance(result, FingerprintMismatch):
                self._mismatch_safely(handler, message, message_id, result)

    def _mismatch_safely(self, handler: Handler, message: Message, message_id: str, exc: FingerprintMismatch) -> None:
        self._transient.safe(handler.scope, message, lambda: self._mismatch(handler, message, message_id, exc))

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
