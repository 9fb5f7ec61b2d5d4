"""Running a relay until it is stopped: batch after batch, backoff after failures, pruning, the backlog gauge.

No failure ends the loop: a transient one (database or broker unavailable,
rows not acknowledged) is retried with exponential backoff, any other after
the longest backoff, with its traceback logged. The rows of a failed batch
stay pending (see :mod:`exactlyonce.outbox`), so a retry re-sends them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import timedelta
from typing import Protocol

from sqlalchemy.engine import Engine

from exactlyonce.errors import TransientError
from exactlyonce.outbox import rows
from exactlyonce.outbox.table import prune
from exactlyonce.storage import engine as _db

log = logging.getLogger("exactlyonce")

#: How long sent rows are kept before :meth:`Relay.run` prunes them.
DEFAULT_RETENTION = timedelta(days=7)
#: How often :meth:`Relay.run` prunes.
PRUNE_INTERVAL = timedelta(hours=1)
#: At most one backlog count per this interval (a COUNT is cheap, not free).
BACKLOG_INTERVAL = timedelta(seconds=1)


class OutboxMetrics(Protocol):
    """What a relay reports to: anything with this method (a Prometheus gauge's owner, a test's list).

    If it also has ``outbox_refused(count)``, that is told the number of rows
    the broker refused and an operator has not yet released or discarded
    (:class:`~exactlyonce.metrics.Metrics` has both).
    """

    def outbox_backlog(self, pending: int) -> None:
        """The number of outbox rows not yet sent, counted after a relay round."""


class Rounds(Protocol):
    """What the loop runs: one batch at a time (a :class:`~exactlyonce.outbox.Relay`)."""

    #: A batch settling fewer rows than this drained the outbox: the loop waits before the next.
    batch_size: int

    def run_once(self, limit: int | None = None) -> int:
        """Send one batch; return how many rows it settled."""


class Backlog:
    """Tells an :class:`OutboxMetrics` the pending and refused counts, at most once per :data:`BACKLOG_INTERVAL`."""

    def __init__(self, engine: Engine, metrics: OutboxMetrics | None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._next = 0.0

    def report(self) -> None:
        """Count and report, unless there is nothing to report to or the last report is too recent."""
        # After failed rounds too: a backlog growing while the broker is down
        # is what the metric is for. A failing count only skips this report.
        if self._metrics is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + BACKLOG_INTERVAL.total_seconds()
        try:
            pending, refused = rows.counts(self._engine)
            self._metrics.outbox_backlog(pending)
            report_refused = getattr(self._metrics, "outbox_refused", None)
            if report_refused is not None:
                report_refused(refused)
        except Exception as exc:
            log.debug("outbox backlog not reported: %s", exc)


def run(
    relay: Rounds,
    stop: threading.Event,
    backlog: Backlog,
    *,
    engine: Engine,
    idle_wait: timedelta,
    retention: timedelta | None,
    max_backoff: timedelta,
) -> None:
    """Run ``relay``'s batches until ``stop`` is set (see :meth:`Relay.run <exactlyonce.outbox.Relay.run>`)."""
    failures = 0
    next_prune = time.monotonic()
    while not stop.is_set():
        try:
            if retention is not None and time.monotonic() >= next_prune:
                prune(engine, retention)
                next_prune = time.monotonic() + PRUNE_INTERVAL.total_seconds()
            sent = relay.run_once()
        except Exception as exc:
            if stop.is_set():
                log.info("outbox relay stopped; rows not acknowledged stay pending (%s)", exc)
                return
            failures += 1
            delay = _backoff(exc, failures, max_backoff)
            backlog.report()
            stop.wait(delay * random.uniform(0.8, 1.0))
            continue
        failures = 0
        backlog.report()
        if sent < relay.batch_size:
            stop.wait(idle_wait.total_seconds())


def _backoff(exc: Exception, failures: int, max_backoff: timedelta) -> float:
    """The wait in seconds (before jitter) after ``failures`` failed rounds in a row, the last with ``exc``; logs it.

    Called while ``exc`` is being handled, so that an unexpected one is logged with its traceback.
    """
    if isinstance(exc, TransientError) or _db.is_transient(exc):
        delay: float = min(max_backoff.total_seconds(), 0.2 * 2 ** min(failures - 1, 16))
        log.warning("outbox relay: %s; retrying in %.1fs", exc, delay)
    else:
        delay = max_backoff.total_seconds()
        log.exception("outbox relay failed; retrying in %.0fs", delay)
    return delay
