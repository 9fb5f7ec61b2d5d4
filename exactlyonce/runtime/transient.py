"""Transient failures, and the retry budget that outlasts them.

A failure that may pass by itself (a lost connection, a deadlock, a lock
wait timeout, a broker that does not answer) is never a record's fault: it
is retried for the App's ``transient_retry_budget`` with jittered
exponential backoff; after that the batch is rewound and polled again, so no
record is dead-lettered or skipped because of it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from exactlyonce.errors import HandlerSignal, MessageError, TransientError
from exactlyonce.message import Message
from exactlyonce.metrics import Metrics
from exactlyonce.storage import engine as _db

log = logging.getLogger("exactlyonce")

T = TypeVar("T")

#: The longest pause (a random share of it) before the smaller transactions
#: of a batch that hit a deadlock or serialization failure are tried.
CONFLICT_BACKOFF_S = 0.2


class Stopped(BaseException):
    """Raised out of a retry wait when a stop was requested (never escapes ``Runner.run``)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or, for a database error, its cause) is a failure a retry may fix."""
    # A handler's exception raised from (or while handling) a deadlock is the
    # deadlock: the database may already have rolled the transaction back.
    return isinstance(exc, TransientError) or _db.is_transient(exc, chained=True)


def transient_unless_conflict(*, lock_waits: bool) -> Callable[[BaseException], bool]:
    """A retry predicate for a transaction of several records: transient failures, but not a lock conflict.

    A conflict is a deadlock or a serialization failure; with
    ``lock_waits`` (a transaction whose lock waits were cut short to find
    deadlocks early: see :func:`~exactlyonce.storage.engine.bound_lock_wait`)
    a lock wait timeout too. A transaction that lost one is not retried as
    it is (it would meet the same rows in the same order): the caller redoes
    its records in smaller transactions
    (:class:`~exactlyonce.runtime.sizing.ConflictSizing`).
    """

    def retry_on(exc: BaseException) -> bool:
        return not _db.is_conflict(exc, lock_waits=lock_waits) and is_transient(exc)

    return retry_on


def is_handler_failure(exc: BaseException) -> bool:
    """Whether a handler's exception is worth another attempt (policy permitting)."""
    return isinstance(exc, Exception) and not (
        isinstance(exc, MessageError | HandlerSignal) or is_transient(exc)
    )


class Transient:
    """Retries of transient failures for the App's budget; waits that end when the worker stops."""

    def __init__(self, stop: threading.Event, budget: timedelta, metrics: Metrics) -> None:
        self._stop = stop
        self._budget_s = budget.total_seconds()
        self._metrics = metrics

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; raise :class:`Stopped` if the worker is stopped meanwhile."""
        if self._stop.wait(seconds):
            raise Stopped

    def retry(
        self, fn: Callable[[], T], *, scope: str = "", retry_on: Callable[[BaseException], bool] = is_transient,
        at_least: timedelta = timedelta(0),
    ) -> T:
        """Run ``fn``, retrying the failures ``retry_on`` accepts for the budget (or ``at_least``); then raise."""

        def before_sleep(state: Any) -> None:
            self._metrics.retry(scope, "transient")
            log.warning("transient failure, retrying: %s", state.outcome and state.outcome.exception())

        return Retrying(
            retry=retry_if_exception(retry_on),
            stop=stop_after_delay(max(self._budget_s, at_least.total_seconds())),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )(fn)

    def safe(
        self, scope: str, message: Message, fn: Callable[[], T],
        retry_on: Callable[[BaseException], bool] = is_transient,
    ) -> T:
        """:meth:`retry`, then a transient failure becomes a :class:`TransientError` (the batch is rewound)."""
        try:
            return self.retry(fn, scope=scope, retry_on=retry_on)
        except TransientError:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(f"{message.where()}: {exc}") from exc
            raise

    def back_off_conflict(self, scope: str, size: int, exc: BaseException) -> None:
        """Count and log a batch lost to a deadlock or serialization failure; wait a random moment.

        Retrying the same batch would meet the same rows in the same order
        again; smaller transactions (down to single records) hold fewer locks for less
        time, and the random pause desynchronizes the workers that collided.
        """
        self._metrics.retry(scope, "transient")
        log.warning("a batch of %d records of %s lost a lock conflict (%s); retrying it in smaller transactions",
                    size, scope, exc)
        self.sleep(random.uniform(0, CONFLICT_BACKOFF_S))
