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

import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from exactlyonce import _db, _session, ids, migrate, signing, store
from exactlyonce import sequence as seq
from exactlyonce._kafka import Consumer, RecordProducer, RecordTooLarge, TopicPartition, to_message
from exactlyonce.errors import (
    BadSequence,
    BadSignature,
    DeadLetter,
    FingerprintMismatch,
    HandlerSignal,
    MessageError,
    OversizedValue,
    SequenceGap,
    Skip,
    TransientError,
)
from exactlyonce.handler import Handler, OnGap, OnMismatch
from exactlyonce.logs import redact
from exactlyonce.message import Message
from exactlyonce.schema import Outcome, counters, parked, processed, sequence_streams
from exactlyonce.settings import utcnow
from exactlyonce.store import Claim, Tally, claim, claim_many, stored_fingerprints

if TYPE_CHECKING:
    from exactlyonce.app import App

log = logging.getLogger("exactlyonce")

T = TypeVar("T")

#: Header names added to a dead-lettered record (the original headers are kept).
DLQ_HEADER_PREFIX = "x-exactlyonce-"

#: A dead letter too large for its topic is sent as a bounded copy instead: the
#: value's first bytes, and the original key and headers only if this small.
BOUNDED_VALUE_BYTES = 1024
BOUNDED_KEY_BYTES = 1024
BOUNDED_HEADERS_BYTES = 8192

#: Distinct dead-letter reasons counted in ``Runner.stats``; more are counted as "other".
MAX_REASONS = 50

#: How often, at most, a runner looks for sequence gaps older than their timeout.
MAX_GAP_CHECK_INTERVAL_S = 30.0

#: The longest pause (a random share of it) before the halves of a batch
#: that hit a deadlock or serialization failure are tried.
CONFLICT_BACKOFF_S = 0.2
#: Lock conflicts a batch may lose and be retried whole before it is retried in halves.
CONFLICT_RETRIES = 2


class _Stopped(BaseException):
    """Raised out of a retry wait when a stop was requested (never escapes run)."""


class _Unclaimable(Exception):
    """A dead letter's message ID could not be claimed (never escapes run: its coordinates are claimed instead)."""


def _is_transient(exc: BaseException) -> bool:
    # A handler's exception raised from (or while handling) a deadlock is the
    # deadlock: the database may already have rolled the transaction back.
    return isinstance(exc, TransientError) or _db.is_transient(exc, chained=True)


def _conflicts_allowed(limit: int) -> Callable[[BaseException], bool]:
    """A retry predicate: transient failures, but at most ``limit`` deadlocks or serialization failures.

    A batch that lost a lock conflict is first retried as it is, after the
    usual jittered backoff (most conflicts are a chance meeting, and the
    backoff parts the workers); one that keeps losing is then retried in
    halves, which hold fewer locks for less time.
    """
    conflicts = 0

    def retry_on(exc: BaseException) -> bool:
        nonlocal conflicts
        if _db.is_conflict(exc):
            conflicts += 1
            return conflicts <= limit
        return _is_transient(exc)

    return retry_on


def _is_handler_failure(exc: BaseException) -> bool:
    """Whether a handler's exception is worth another attempt (policy permitting)."""
    return isinstance(exc, Exception) and not (
        isinstance(exc, MessageError | HandlerSignal) or _is_transient(exc)
    )


class Runner:
    """Runs an :class:`~exactlyonce.App` until its stop event is set."""

    def __init__(
        self,
        app: App,
        stop: threading.Event,
        *,
        poll_timeout_s: float = 0.5,
        consumer_factory: Callable[..., Consumer] = Consumer,
        producer_factory: Callable[..., RecordProducer] = RecordProducer,
    ) -> None:
        """``consumer_factory`` / ``producer_factory`` are for tests (the in-memory twins of
        ``tests/twins.py``): called with :class:`Consumer`'s / :class:`RecordProducer`'s keywords."""
        self._app = app
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory
        self._handlers = app.handlers
        self._stop = stop
        self._poll_timeout_s = poll_timeout_s
        self._engine = app.engine
        #: Next offset to commit per partition: everything below is in the database.
        self._done: dict[TopicPartition, int] = {}
        self._consumer: Consumer | None = None
        self._producer: RecordProducer | None = None
        self.stats = app.stats
        self._metrics = app.metrics
        self._signing_keys = app.signing_keys
        self._sequenced = [h for h in self._handlers.values() if h.sequence is not None]
        self._next_gap_check = 0.0
        #: A bounded step of sequence work stopped with more to do: continue
        #: right after the next poll, which then does not wait.
        self._more_sequence_work = False
        #: (scope, stream, gap_since) of the gaps already logged, to log each once.
        self._reported_gaps: set[tuple[str, str, Any]] = set()

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; always commit what is done and leave the group."""
        try:
            self._check_schema()
        except _Stopped:
            return
        self._consumer = self._consumer_factory(
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
                    batch = self._consumer.poll(0 if self._more_sequence_work else self._poll_timeout_s)
                except TransientError as exc:
                    log.warning("%s; polling again", exc)
                    self._stop.wait(1.0)
                    continue
                if batch:
                    batch = self._fill(batch)
                    self._process_batch(batch)
                    self._commit()
                    self._report_lag(batch)
                self._continue_sequences()
        except _session.Unrunnable as unrunnable:
            # A handler that can never succeed (it returned a coroutine): stop
            # loudly. Its transaction rolled back; what committed before is
            # committed below; the record in hand is redelivered after the fix.
            log.error("%s", unrunnable.error)
            raise unrunnable.error from None
        finally:
            self._commit()
            self._consumer.close()
            if self._producer is not None:
                self._producer.close()
            log.info("stopped: %s", dict(self.stats))

    def _fill(self, batch: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """Keep polling for up to ``batch_wait`` while the batch is below the largest batch size."""
        wait = self._app.batch_wait.total_seconds()
        target = max(handler.batch_size for handler in self._handlers.values())
        deadline = time.monotonic() + wait
        count = sum(map(len, batch.values()))
        while wait and count < target and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                more = self._consumer_or_fail().poll(remaining)
            except TransientError:
                break
            for tp, records in more.items():
                batch.setdefault(tp, []).extend(records)
                count += len(records)
        # A rebalance inside those polls may have moved partitions away: their
        # records are the new owner's now.
        assigned = self._consumer_or_fail().assignment()
        return {tp: records for tp, records in batch.items() if tp in assigned}

    def _check_schema(self) -> None:
        needed = [processed, counters]
        if self._sequenced:
            needed += [sequence_streams, parked]
        self._retry_transient(lambda: migrate.require_tables(self._engine, *needed))

    # -- the poll batch -----------------------------------------------------

    def _process_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        # Next record to process per partition; on an abort every partition is
        # rewound to it so that the next poll hands those records back.
        pending = {tp: records[0].offset for tp, records in batch.items() if records}
        by_topic: dict[str, list[Message]] = {}
        for records in batch.values():
            for record in records:
                by_topic.setdefault(record.topic, []).append(to_message(record))
        try:
            for topic, messages in by_topic.items():
                handler = self._handlers[topic]
                for start in range(0, len(messages), handler.batch_size):
                    if self._stop.is_set():
                        raise _Stopped
                    chunk = messages[start : start + handler.batch_size]
                    for outcome in self._process_chunk(handler, chunk):
                        self.stats[outcome] += 1
                        self._metrics.outcome(handler.scope, outcome)
                    # The chunk committed: everything in it is done.
                    for message in chunk:
                        tp = TopicPartition(message.topic, message.partition)
                        pending[tp] = self._done[tp] = message.offset + 1
        except TransientError as exc:
            log.error("%s; rewinding to retry after the next poll", exc)
            for tp, offset in pending.items():
                self._consumer_or_fail().seek(tp, offset)
        except _Stopped:
            # Unprocessed records stay uncommitted: the next owner gets them.
            return

    def _process_chunk(self, handler: Handler, messages: list[Message]) -> list[str]:
        """Handle ``messages`` (each partition's in order); return their outcomes.

        Records that cannot be handled (bad signature, no usable ID,
        oversized) are dead-lettered one by one; the others are claimed and
        handled together. A sequenced handler's outcomes include those of the
        parked records its records released.
        """
        if handler.sequence is not None:
            return self._process_sequenced(handler, messages)
        outcomes: list[str] = []
        good: list[tuple[Message, str]] = []
        strategy = handler.message_id or ids.header()
        for message in messages:
            try:
                self._check(handler, message)
                good.append((message, self._derive(lambda m: ids.resolve(strategy, m), message)))
            except MessageError as exc:
                outcomes.append(self._dead_letter_safely(handler, message, exc))
        return outcomes + (self._run(handler, good) if good else [])

    def _check(self, handler: Handler, message: Message) -> None:
        """Refuse a record before anything is claimed: forged or unsigned, or too large."""
        if self._signing_keys is not None:
            signing.verify(message, self._signing_keys)
        if handler.max_value_bytes is not None and len(message.value or b"") > handler.max_value_bytes:
            raise OversizedValue(
                f"{message.where()}: value has {len(message.value or b'')} bytes, "
                f"more than max_value_bytes={handler.max_value_bytes}"
            )

    def _derive(self, derive: Callable[[Message], T], message: Message) -> T:
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

    def _dead_letter_safely(self, handler: Handler, message: Message, exc: MessageError) -> str:
        return self._transient_safe(
            handler, message, lambda: self._dead_letter(handler, message, None, exc, attempts=0)
        )

    def _run(self, handler: Handler, items: list[tuple[Message, str]]) -> list[str]:
        """Apply ``items`` in one transaction; on a handler failure, bisect.

        Halving isolates a failing record in O(log n) transactions without a
        savepoint per record; a single record then gets its retry policy and,
        if it keeps failing, its dead letter. Earlier halves commit first, so
        each partition's order is kept.
        """
        if len(items) == 1:
            message, message_id = items[0]
            return [self._transient_safe(handler, message, lambda: self._handle(handler, message, message_id))]
        try:
            results = self._transient_safe(handler, items[0][0], lambda: self._apply(handler, items),
                                           retry_on=_conflicts_allowed(CONFLICT_RETRIES))
        except TransientError as exc:
            if not _db.is_conflict(exc):
                raise
            self._back_off_conflict(handler, len(items), exc)
            middle = len(items) // 2
            return self._run(handler, items[:middle]) + self._run(handler, items[middle:])
        except Exception as exc:
            log.info("a batch of %d failed (%s: %s); splitting it", len(items), type(exc).__name__, exc)
            middle = len(items) // 2
            return self._run(handler, items[:middle]) + self._run(handler, items[middle:])
        outcomes = []
        for (message, message_id), result in zip(items, results, strict=True):
            if isinstance(result, FingerprintMismatch):
                result = self._mismatch_safely(handler, message, message_id, result)
            outcomes.append(result)
        return outcomes

    def _transient_safe(
        self, handler: Handler, message: Message, fn: Callable[[], T],
        retry_on: Callable[[BaseException], bool] = _is_transient,
    ) -> T:
        """Run ``fn`` with transient retries (of the failures ``retry_on`` accepts); then raise TransientError."""
        try:
            return self._retry_transient(fn, scope=handler.scope, retry_on=retry_on)
        except TransientError:
            raise
        except Exception as exc:
            if _is_transient(exc):
                raise TransientError(f"{message.where()}: {exc}") from exc
            raise

    def _handle(self, handler: Handler, message: Message, message_id: str) -> str:
        """One record on its own: apply it with retries, or skip or dead-letter it."""
        attempts = 0

        def attempt() -> str:
            nonlocal attempts
            attempts += 1
            (result,) = self._apply(handler, [(message, message_id)])
            if isinstance(result, FingerprintMismatch):
                raise result
            return result

        try:
            return handler.retry.retrying(retryable=_is_handler_failure, sleep=self._sleep)(attempt)
        except Skip as signal:
            self._count_retries(handler, attempts)
            _log_skip(handler, message, message_id, signal)
            return self._record_skip(handler, message, message_id)
        except FingerprintMismatch as exc:
            self._count_retries(handler, attempts)
            return self._mismatch(handler, message, message_id, exc)
        except (DeadLetter, MessageError) as exc:
            self._count_retries(handler, attempts)
            return self._dead_letter(handler, message, message_id, exc, attempts)
        except Exception as exc:
            if _is_transient(exc):
                raise
            self._count_retries(handler, attempts)
            _log_failure(handler, message, message_id, attempts, exc)
            return self._dead_letter(handler, message, message_id, exc, attempts)

    def _apply(self, handler: Handler, items: list[tuple[Message, str]]) -> list[str | FingerprintMismatch]:
        """Claim and handle ``items`` in ONE transaction; return their outcomes.

        Raises whatever the handler raised (the transaction rolls back: no
        effect and no dedup row is kept). A record whose ID is known with
        another payload gets a :class:`FingerprintMismatch` as its outcome,
        for the caller to handle after the commit.
        """
        results: list[str | FingerprintMismatch] = []
        with _session.HandlerSession(self._engine) as session, session.begin():
            # The dedup rows go in first: the unique index decides who owns each
            # message before any effect is written. A repeated ID within the
            # batch is claimed once, by its first occurrence.
            first: dict[str, int] = {}
            for index, (_, message_id) in enumerate(items):
                first.setdefault(message_id, index)
            new = claim_many(session, handler.scope, [(items[i][1], items[i][0]) for i in first.values()])
            known = stored_fingerprints(session, handler.scope, {mid for _, mid in items if mid not in new})
            fresh: list[Message] = []
            for index, (message, message_id) in enumerate(items):
                if message_id in new and first[message_id] == index:
                    fresh.append(message)
                    results.append("applied")
                    continue
                stored = known.get(message_id) or items[first[message_id]][0].fingerprint()
                if stored == message.fingerprint():
                    results.append("duplicate")
                else:
                    results.append(FingerprintMismatch(
                        f"{message.where()}: message ID {message_id!r} was processed before with a "
                        f"different payload (sha256 {stored[:12]}…, now {message.fingerprint()[:12]}…)"
                    ))
            if fresh:
                if handler.batch:
                    self._call(handler, fresh, session)
                else:
                    for message in fresh:
                        self._call(handler, message, session)
            tally = Tally()
            for (message, message_id), result in zip(items, results, strict=True):
                if isinstance(result, str):
                    tally.add(message, result)
                    _log_decision(handler, message, message_id, result)
            store.count(session, self._app.group_id, handler.scope, tally)
        return results

    def _call(self, handler: Handler, arg: Any, session: _session.HandlerSession) -> None:
        """Call the handler once (a record, or a batch's list), timing the call alone."""
        started = time.monotonic()
        _session.call(handler.func, arg, session, handler.scope)
        self._metrics.handler_seconds(handler.scope, time.monotonic() - started)

    def _count_retries(self, handler: Handler, attempts: int) -> None:
        for _ in range(attempts - 1):
            self._metrics.retry(handler.scope, "handler")

    def _mismatch_safely(
        self, handler: Handler, message: Message, message_id: str, exc: FingerprintMismatch
    ) -> str:
        return self._transient_safe(handler, message, lambda: self._mismatch(handler, message, message_id, exc))

    def _mismatch(self, handler: Handler, message: Message, message_id: str, exc: FingerprintMismatch) -> str:
        self.stats["fingerprint_mismatch"] += 1
        self._metrics.outcome(handler.scope, "fingerprint_mismatch")
        if handler.on_fingerprint_mismatch is OnMismatch.SKIP:
            log.warning("%s; skipped as a duplicate", exc,
                        extra=_fields(handler, message, message_id, "duplicate", reason=exc.reason))
            with Session(self._engine) as session, session.begin():
                self._count(session, handler, message, "duplicate")
            return "duplicate"
        return self._dead_letter(handler, message, message_id, exc, attempts=0)

    def _record_skip(self, handler: Handler, message: Message, message_id: str) -> str:
        with Session(self._engine) as session, session.begin():
            claimed = claim(session, handler.scope, message_id, message, outcome=Outcome.SKIPPED)
            outcome = "skipped" if claimed is Claim.NEW else "duplicate"
            self._count(session, handler, message, outcome)
        return outcome

    def _count(self, session: Session, handler: Handler, message: Message, outcome: str) -> None:
        tally = Tally()
        tally.add(message, outcome)
        store.count(session, self._app.group_id, handler.scope, tally)

    # -- sequenced handlers -------------------------------------------------

    def _process_sequenced(self, handler: Handler, messages: list[Message]) -> list[str]:
        outcomes: list[str] = []
        items: list[tuple[Message, str, str, int]] = []
        for message in messages:
            try:
                self._check(handler, message)
                message_id, stream, number = self._derive(lambda m: self._sequence_and_id(handler, m), message)
                items.append((message, message_id, stream, number))
            except MessageError as exc:
                outcomes.append(self._dead_letter_safely(handler, message, exc))
        if items:
            outcomes += self._run_sequenced(handler, items)
        return outcomes

    def _run_sequenced(self, handler: Handler, items: list[tuple[Message, str, str, int]]) -> list[str]:
        """Apply ``items`` in one transaction; after a deadlock or serialization failure, in halves."""
        if len(items) == 1:
            return self._transient_safe(handler, items[0][0], lambda: self._apply_sequenced(handler, items))
        try:
            return self._transient_safe(handler, items[0][0], lambda: self._apply_sequenced(handler, items),
                                        retry_on=_conflicts_allowed(CONFLICT_RETRIES))
        except TransientError as exc:
            if not _db.is_conflict(exc):
                raise
            self._back_off_conflict(handler, len(items), exc)
            middle = len(items) // 2
            return self._run_sequenced(handler, items[:middle]) + self._run_sequenced(handler, items[middle:])

    def _back_off_conflict(self, handler: Handler, size: int, exc: BaseException) -> None:
        """Count and log a batch lost to a deadlock or serialization failure; wait a random moment.

        Retrying the same batch would meet the same rows in the same order
        again; halves (down to single records) hold fewer locks for less
        time, and the random pause desynchronizes the workers that collided.
        """
        self._metrics.retry(handler.scope, "transient")
        log.warning("a batch of %d records of %s lost a lock conflict (%s); retrying it in halves",
                    size, handler.scope, exc)
        self._sleep(random.uniform(0, CONFLICT_BACKOFF_S))

    def _sequence_and_id(self, handler: Handler, message: Message) -> tuple[str, str, int]:
        stream, number = seq.parse(self._sequence_of(handler, message), message)
        return self._sequenced_id(handler, message, stream, number), stream, number

    @staticmethod
    def _sequence_of(handler: Handler, message: Message) -> Any:
        assert handler.sequence is not None
        try:
            return handler.sequence(message)
        except MessageError:
            raise
        except Exception as exc:
            raise BadSequence(f"{message.where()}: sequence raised {type(exc).__name__}: {exc}") from exc

    @staticmethod
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

    def _apply_sequenced(self, handler: Handler, items: list[tuple[Message, str, str, int]]) -> list[str]:
        """Handle ``items`` in ONE transaction, each stream in number order; return the outcomes.

        Per record: a number at or below the stream's watermark is a
        duplicate; the next number is handled, the watermark advances, and
        the parked successors it unblocks are handled after it (at most
        ``batch_size`` of them in this transaction; the rest in transactions
        of their own, see :meth:`_release_ready`); a later number is parked. A record whose handler keeps failing is
        dead-lettered and its number counts as handled, so the stream moves
        on. Dead letters are sent inside the transaction: if it rolls back,
        they may be sent again (at least once), never lost.
        """
        outcomes: list[str] = []
        dead: list[tuple[Message, BaseException]] = []
        tally = Tally()
        scope = handler.scope
        #: Parked records this transaction may still release (see _release).
        budget = handler.batch_size
        with _session.HandlerSession(self._engine) as session, session.begin():
            now = utcnow()
            streams = seq.lock(session, scope, (name for _, _, name, _ in items), now)
            for message, message_id, name, number in items:
                stream = streams[name]
                if number <= stream.watermark:
                    outcome = "duplicate"
                elif number > stream.watermark + 1:
                    stored = seq.park(session, scope, name, number, message_id, message, now)
                    if stored is None:
                        stream.parked += 1
                        stream.gap_since = stream.gap_since or now
                        outcome = "parked"
                    elif stored == message.fingerprint():
                        outcome = "duplicate"
                    else:
                        outcome = self._sequenced_mismatch(handler, message, message_id, name, number, dead)
                else:
                    stored = seq.parked_fingerprint(session, scope, name, number) if stream.parked else None
                    if stored is None:
                        outcome = self._call_in_order(handler, session, message, message_id, dead)
                        stream.watermark = number
                        stream.gap_since = None  # the gap, if any, moves on: its clock restarts
                    elif stored == message.fingerprint():
                        # Parked already, by a release cut short: released below.
                        outcome = "duplicate"
                    else:
                        outcome = self._sequenced_mismatch(handler, message, message_id, name, number, dead)
                    budget -= self._release(handler, session, stream, budget, dead, tally, outcomes, now)
                tally.add(message, outcome)
                outcomes.append(outcome)
                _log_decision(handler, message, message_id, outcome, stream=name, number=number)
            seq.save(session, scope, streams.values(), now)
            store.count(session, self._app.group_id, scope, tally)
        for message, exc in dead:
            self._dead_lettered(handler, message, exc)
        return outcomes

    def _release(
        self,
        handler: Handler,
        session: _session.HandlerSession,
        stream: seq.Stream,
        budget: int,
        dead: list[tuple[Message, BaseException]],
        tally: Tally,
        outcomes: list[str],
        now: Any,
    ) -> int:
        """Handle the parked successors of ``stream``'s watermark, at most ``budget``; return how many.

        A gap filled after a long wait may have unblocked any number of
        parked records; one transaction takes a bounded share, so that its
        locks, its memory and its time stay bounded. When the budget runs out
        with the next number parked, the stream is *ready*: its gap clock is
        stopped and :meth:`_release_ready` continues (on this worker right
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
            outcome = self._call_in_order(handler, session, parked_message, parked_id, dead)
            tally.add(parked_message, outcome)
            outcomes.append(outcome)
        if not stream.parked:
            stream.gap_since = None
        elif released >= budget and seq.parked_fingerprint(
            session, handler.scope, stream.stream, stream.watermark + 1
        ) is not None:
            stream.gap_since = None
            self._more_sequence_work = True
        elif released or stream.gap_since is None:
            stream.gap_since = now
        return released

    def _release_ready(self, handler: Handler) -> bool:
        """Continue releases cut short, in ONE transaction of at most ``batch_size`` records.

        Returns whether more may be ready.
        """
        outcomes: list[str] = []
        dead: list[tuple[Message, BaseException]] = []
        tally = Tally()
        scope = handler.scope
        budget = handler.batch_size
        with _session.HandlerSession(self._engine) as session, session.begin():
            names = seq.ready(session, scope, limit=budget)
            if not names:
                return False
            now = utcnow()
            streams = seq.lock(session, scope, names, now)
            for stream in streams.values():
                if budget <= 0:
                    break
                budget -= self._release(handler, session, stream, budget, dead, tally, outcomes, now)
            seq.save(session, scope, streams.values(), now)
            store.count(session, self._app.group_id, scope, tally)
        for message, exc in dead:
            self._dead_lettered(handler, message, exc)
        for outcome in outcomes:
            self.stats[outcome] += 1
            self._metrics.outcome(scope, outcome)
        return budget <= 0

    def _sequenced_mismatch(
        self, handler: Handler, message: Message, message_id: str, stream: str, number: int,
        dead: list[tuple[Message, BaseException]],
    ) -> str:
        exc = FingerprintMismatch(
            f"{message.where()}: number {number} of stream {stream!r} is parked with a different payload"
        )
        self.stats["fingerprint_mismatch"] += 1
        self._metrics.outcome(handler.scope, "fingerprint_mismatch")
        if handler.on_fingerprint_mismatch is OnMismatch.SKIP:
            log.warning("%s; skipped as a duplicate", exc,
                        extra=_fields(handler, message, message_id, "duplicate", reason=exc.reason))
            return "duplicate"
        self._publish_dead_letter(handler, message, message_id, exc, attempts=0)
        dead.append((message, exc))
        return "dead_lettered"

    def _call_in_order(
        self,
        handler: Handler,
        session: _session.HandlerSession,
        message: Message,
        message_id: str,
        dead: list[tuple[Message, BaseException]],
    ) -> str:
        """Run the handler for one record in a savepoint, with its retry policy; return the outcome.

        A failed attempt rolls back to the savepoint only, keeping what the
        transaction did for the records before it.
        """
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            # If the database rolled back the whole transaction under the
            # savepoint (a deadlock on InnoDB), this raises TransientError:
            # the whole transaction is retried, never continued.
            with _db.savepoint(session):
                self._call(handler, message, session)

        try:
            handler.retry.retrying(retryable=_is_handler_failure, sleep=self._sleep)(attempt)
            outcome = "applied"
        except Skip as signal:
            _log_skip(handler, message, message_id, signal)
            outcome = "skipped"
        except Exception as exc:
            if _is_transient(exc):
                raise
            if not isinstance(exc, DeadLetter | MessageError):
                _log_failure(handler, message, message_id, attempts, exc)
            self._publish_dead_letter(handler, message, message_id, exc, attempts)
            dead.append((message, exc))
            outcome = "dead_lettered"
        self._count_retries(handler, attempts)
        return outcome

    def _continue_sequences(self) -> None:
        """Between polls: continue cut-short releases, report old gaps and apply the gap policy.

        Runs every ``gap_timeout / 4`` (at most every 30 s), and after every
        poll while a bounded step left more to do. Each step is one bounded
        transaction per handler, so polls (and the group's liveness) go on
        between steps.
        """
        if not self._sequenced:
            return
        if not self._more_sequence_work and time.monotonic() < self._next_gap_check:
            return
        interval = min(min(h.gap_timeout.total_seconds() for h in self._sequenced) / 4, MAX_GAP_CHECK_INTERVAL_S)
        self._next_gap_check = time.monotonic() + max(interval, 0.2)
        more = False
        for handler in self._sequenced:
            try:
                more = self._release_ready(handler) or more
                more = self._handle_gaps(handler) or more
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                log.warning("sequence work for %s failed, trying again later: %s", handler.scope, exc)
        self._more_sequence_work = more

    def _handle_gaps(self, handler: Handler) -> bool:
        """Report or give up the gaps older than ``gap_timeout``; return whether more are left to give up."""
        scope = handler.scope
        now = utcnow()
        cutoff = now - handler.gap_timeout
        if handler.on_gap is OnGap.WAIT:
            with Session(self._engine) as session:
                late = seq.overdue(session, scope, cutoff)
            self._metrics.open_gaps(scope, len(late))
            # Remember only the gaps still open, so the set stays as small as they are.
            open_now = {(scope, stream.stream, stream.gap_since) for stream in late}
            reported = {gap for gap in self._reported_gaps if gap[0] == scope}
            self._reported_gaps = (self._reported_gaps - reported) | open_now
            for stream in late:
                if (scope, stream.stream, stream.gap_since) not in reported:
                    log.warning(
                        "%s: stream %r has waited for number %d since %s UTC (gap_timeout %s); "
                        "%d message(s) parked behind it, waiting",
                        scope, stream.stream, stream.watermark + 1, stream.gap_since, handler.gap_timeout,
                        stream.parked, extra={"scope": scope, "stream": stream.stream,
                                              "number": stream.watermark + 1, "outcome": "gap"},
                    )
            return False
        # Give up: dead-letter the parked records, at most batch_size in one
        # transaction (it holds the streams' locks while it publishes them).
        dead: list[tuple[Message, BaseException]] = []
        tally = Tally()
        budget = handler.batch_size
        with Session(self._engine) as session, session.begin():
            late = seq.overdue(session, scope, cutoff, lock_rows=True, limit=budget)
            for stream in late:
                if budget <= 0:
                    break
                taken = seq.take_first(session, scope, stream.stream, budget)
                for number, message_id, message in taken:
                    exc = SequenceGap(
                        f"stream {stream.stream!r} of {scope} waited for number {stream.watermark + 1} "
                        f"since {stream.gap_since} UTC, longer than gap_timeout {handler.gap_timeout}: "
                        f"parked number {number} dead-lettered"
                    )
                    self._publish_dead_letter(handler, message, message_id, exc, attempts=0)
                    dead.append((message, exc))
                    tally.add(message, "dead_lettered")
                if len(taken) < budget:
                    stream.parked = 0  # all of them
                else:
                    stream.parked = max(stream.parked - len(taken), 1)
                budget -= len(taken)
                if not stream.parked:
                    stream.gap_since = None
            seq.save(session, scope, late, now)
            store.count(session, self._app.group_id, scope, tally)
        self._metrics.open_gaps(scope, sum(1 for stream in late if stream.parked))
        for message, error in dead:
            self._dead_lettered(handler, message, error)
            self.stats["dead_lettered"] += 1
            self._metrics.outcome(scope, "dead_lettered")
        return budget <= 0

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
        # record is not dead-lettered twice. A record with a bad signature is
        # not recorded at all: its ID is not to be trusted, and a forged record
        # must not claim the ID of a genuine one.
        if message_id is None or isinstance(exc, FingerprintMismatch):
            return self._dead_letter_as(handler, message, message_id, exc, attempts, _coordinates_id(message))
        try:
            return self._dead_letter_as(handler, message, message_id, exc, attempts, message_id)
        except _Unclaimable as failure:
            # The ID itself cannot be stored (whatever slipped past ids.resolve):
            # claiming it again would fail again and stop the worker. The
            # coordinates always can be.
            log.warning("%s: cannot record the dead letter under message ID %r (%s); "
                        "recording it under its coordinates", message.where(), message_id, failure.__cause__,
                        extra=_fields(handler, message, None, "dead_lettered"))
            return self._dead_letter_as(handler, message, message_id, exc, attempts, _coordinates_id(message))

    def _dead_letter_as(
        self,
        handler: Handler,
        message: Message,
        message_id: str | None,
        exc: BaseException,
        attempts: int,
        record_id: str,
    ) -> str:
        """Dead-letter ``message``, recording it in the dedup table as ``record_id``."""
        with Session(self._engine) as session, session.begin():
            if (
                not isinstance(exc, BadSignature)
                and self._claim_dead_letter(session, handler, message, record_id) is Claim.DUPLICATE
            ):
                self._count(session, handler, message, "duplicate")
                return "duplicate"
            self._count(session, handler, message, "dead_lettered")
            # Publish inside the transaction: if the broker does not acknowledge,
            # the dead-letter row rolls back and the offset does not advance.
            self._publish_dead_letter(handler, message, message_id, exc, attempts)
        self._dead_lettered(handler, message, exc)
        return "dead_lettered"

    @staticmethod
    def _claim_dead_letter(session: Session, handler: Handler, message: Message, record_id: str) -> Claim:
        try:
            return claim(session, handler.scope, record_id, message, outcome=Outcome.DEAD_LETTERED)
        except Exception as failure:
            if _is_transient(failure) or record_id == _coordinates_id(message):
                raise
            raise _Unclaimable(record_id) from failure

    def _publish_dead_letter(
        self, handler: Handler, message: Message, message_id: str | None, exc: BaseException, attempts: int
    ) -> None:
        """Send ``message`` to the handler's dead-letter topic, with why; wait for the broker's ACK."""
        headers = [
            *message.headers,
            *(
                (DLQ_HEADER_PREFIX + name, value.encode("utf-8", "backslashreplace"))
                for name, value in (
                    ("reason", _reason(exc)),
                    ("error-type", type(exc).__name__),
                    ("error-message", _error_message(exc)),
                    ("topic", message.topic),
                    ("partition", str(message.partition)),
                    ("offset", str(message.offset)),
                    ("message-id", "" if isinstance(exc, BadSignature) else message_id or ""),
                    ("attempts", str(attempts)),
                    ("scope", handler.scope),
                )
            ),
        ]
        try:
            self._publish(handler.dead_letter_topic, message.key, message.value, headers)
        except RecordTooLarge as exc:
            # The copy is larger than the original (the headers above): a record
            # near the topic's size limit would be refused forever. Send a bounded
            # copy, marked as cut, so the partition moves on; if even that is
            # refused, the topic's limit is the problem: the error stops the worker.
            key, value, bounded = _bounded_copy(message, headers[len(message.headers):])
            log.warning("%s: %s; dead-lettering a bounded copy (value cut to %d of %d bytes)", message.where(),
                        exc, len(value or b""), len(message.value or b""),
                        extra=_fields(handler, message, message_id, "dead_lettered"))
            try:
                self._publish(handler.dead_letter_topic, key, value, bounded)
            except RecordTooLarge as again:
                raise RecordTooLarge(
                    f"dead-letter topic {handler.dead_letter_topic!r} refuses even a bounded dead letter of "
                    f"{_size(key, value, bounded)} bytes: raise its max.message.bytes ({again})"
                ) from again

    def _dead_lettered(self, handler: Handler, message: Message, exc: BaseException) -> None:
        """Count and log a dead letter whose transaction committed."""
        reason = _reason(exc)
        # A DeadLetter's reason is the handler's free text: count at most
        # MAX_REASONS distinct ones, the rest as "other".
        counted = reason
        known = sum(1 for key in self.stats if key.startswith("dead_lettered:"))
        if f"dead_lettered:{reason}" not in self.stats and known >= MAX_REASONS:
            counted = "other"
        self.stats[f"dead_lettered:{counted}"] += 1
        log.error("%s: dead-lettered to %s (%s: %s)", message.where(), handler.dead_letter_topic, reason, exc,
                  extra=_fields(handler, message, None, "dead_lettered", reason=reason))

    def _publish(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Publish one dead letter and wait for the broker's ACK.

        After a failure the next publish gets a new producer: kafka-python's
        idempotent producer refuses every later record once one was refused
        (too large, say), and a new one also starts with fresh connections.
        """
        try:
            self._dead_letter_producer().publish(topic, key=key, value=value, headers=headers)
        except Exception:
            producer, self._producer = self._producer, None
            if producer is not None:
                with contextlib.suppress(Exception):
                    producer.close(0.0)
            raise

    def _dead_letter_producer(self) -> RecordProducer:
        if self._producer is None:
            self._producer = self._producer_factory(
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
        for tp in revoked:
            self._metrics.forget_partition(tp.topic, tp.partition)

    def _report_lag(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Publish each polled partition's lag: records behind the end as of the last fetch."""
        consumer = self._consumer_or_fail()
        for tp, records in batch.items():
            end = consumer.highwater(tp)
            if end is not None and records:
                self._metrics.consumer_lag(tp.topic, tp.partition, max(end - records[-1].offset - 1, 0))

    def _consumer_or_fail(self) -> Consumer:
        if self._consumer is None:  # pragma: no cover - run() sets it first
            raise RuntimeError("consumer not started")
        return self._consumer

    # -- retries ------------------------------------------------------------

    def _retry_transient(
        self, fn: Callable[[], T], *, scope: str = "", retry_on: Callable[[BaseException], bool] = _is_transient
    ) -> T:
        """Retry ``fn`` on transient failures (those ``retry_on`` accepts) for the app's budget, then raise."""

        def before_sleep(state: Any) -> None:
            self._metrics.retry(scope, "transient")
            log.warning("transient failure, retrying: %s", state.outcome and state.outcome.exception())

        return Retrying(
            retry=retry_if_exception(retry_on),
            stop=stop_after_delay(self._app.transient_retry_budget.total_seconds()),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )(fn)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped


def _succeeds(fn: Callable[[Message], Any], message: Message) -> bool:
    try:
        fn(message)
    except Exception:
        return False
    return True


def _coordinates_id(message: Message) -> str:
    # The prefix is refused in message IDs (ids.resolve): no sender can forge these.
    coordinates = f"{ids.RESERVED_PREFIX}{message.topic}/{message.partition}/{message.offset}"
    if len(coordinates) <= ids.MAX_MESSAGE_ID_LENGTH:
        return coordinates
    return ids.RESERVED_PREFIX + hashlib.sha256(coordinates.encode()).hexdigest()


def _error_message(exc: BaseException) -> str:
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


def _bounded_copy(
    message: Message, ours: list[tuple[str, bytes]]
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
    headers = list(message.headers)
    if _size(None, None, headers) > BOUNDED_HEADERS_BYTES:
        headers = []
        marks.append(("headers-omitted", str(len(message.headers))))
    bounded = [*headers, *((name, data[:1000]) for name, data in ours)]
    bounded += [(DLQ_HEADER_PREFIX + name, text.encode("utf-8")) for name, text in marks]
    return key, value, bounded


def _size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(name.encode("utf-8")) + len(data) for name, data in headers)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or "handler-error"


def _fields(
    handler: Handler, message: Message, message_id: str | None, outcome: str, **more: Any
) -> dict[str, Any]:
    """The structured fields of a log line about one record (``exactlyonce run --log-format json``)."""
    fields = {"scope": handler.scope, "topic": message.topic, "partition": message.partition,
              "offset": message.offset, "outcome": outcome, **more}
    if message_id is not None:
        fields["message_id"] = message_id
    return fields


def _log_skip(handler: Handler, message: Message, message_id: str, signal: Skip) -> None:
    log.info("%s: handler skipped %r: %s", message.where(), message_id, signal.reason,
             extra=_fields(handler, message, message_id, "skipped", reason=signal.reason))


def _log_failure(handler: Handler, message: Message, message_id: str, attempts: int, exc: BaseException) -> None:
    log.error("%s: handler for %s failed after %d attempt(s): %s: %s", message.where(), handler.scope, attempts,
              type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG),
              extra=_fields(handler, message, message_id, "failed"))


def _log_decision(handler: Handler, message: Message, message_id: str, outcome: str, **more: Any) -> None:
    """One DEBUG line per record decided (costs nothing unless DEBUG is on)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s %r", message.where(), outcome, message_id,
                  extra=_fields(handler, message, message_id, outcome, **more))
