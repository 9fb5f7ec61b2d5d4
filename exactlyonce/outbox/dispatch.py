"""The order of a batch's sends (step 3 of :mod:`exactlyonce.outbox`): flights that keep each key's order.

kafka-python's idempotent producer treats a refusal as fatal: it fails every
record in flight with the same error, and whether those were written is
unknown. So a row that may be refused (one larger than every row
acknowledged on its topic so far: the first of a topic, say) goes alone, and
its key's later rows wait for its outcome. The other rows ("safe") go
together: each key's leading run of them, in ``id`` order. A refusal met
with other records in flight (or a failure for a batch-mate's fault) is
confirmed by sending the row alone before the row is marked refused. A row
that fails otherwise (a timeout, the broker unavailable) stops its key for
the rest of the batch; the rows of other keys go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from exactlyonce import _kafka
from exactlyonce.outbox.publishing import decode_headers
from exactlyonce.outbox.sender import Outcomes, Sender

log = logging.getLogger("exactlyonce")

# The largest row a relay saw acknowledged, per topic, is remembered for at
# most this many topics (then forgotten, which only costs a few rows sent alone).
_MAX_PROVEN_TOPICS = 10_000


@dataclass(slots=True)
class Batch:
    """What became of one batch's rows."""

    sent: list[int] = field(default_factory=list)
    #: (row, why) for the rows the broker refused for good.
    refused: list[tuple[sa.Row[Any], str]] = field(default_factory=list)
    #: Rows that failed for another reason (they stay pending), and the first such error.
    failed: int = 0
    failure: BaseException | None = None


@dataclass(slots=True)
class _Progress:
    """One batch between its flights."""

    #: The rows still to send, in ``id`` order.
    queue: list[sa.Row[Any]]
    sizes: dict[int, int]
    batch: Batch = field(default_factory=Batch)
    #: Ordering keys with a row that failed: their later rows wait.
    stopped: set[str] = field(default_factory=set)
    #: Topics whose records could not even be queued.
    unreachable: set[str] = field(default_factory=set)
    #: Rows refused with other records in flight: to be tried alone.
    suspects: set[int] = field(default_factory=set)


class Dispatcher:
    """Sends a batch's rows in flights through a :class:`~exactlyonce.outbox.sender.Sender`, each key in order."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        #: Per topic, the size (see :func:`size`) of the largest row acknowledged: a row no larger
        #: cannot be refused for its size, so the rows of a key up to the next larger one go together.
        self.proven: dict[str, int] = {}

    def send(self, rows: Sequence[sa.Row[Any]]) -> Batch:
        """Send ``rows`` so that each key keeps its order whatever fails; say what became of each."""
        progress = _Progress(queue=list(rows), sizes={row.id: size(row) for row in rows})
        while progress.queue:
            flight = self._next_flight(progress)
            try:
                outcomes = self._sender.send_flight(flight, progress.unreachable)
            except Exception as exc:
                # A new producer that cannot connect, say: what was
                # acknowledged so far is still marked sent; the rest waits.
                self._sender.reset()
                progress.batch.failed += len(progress.queue)
                progress.batch.failure = progress.batch.failure or exc
                return progress.batch
            settled = self._settle(flight, outcomes, progress)
            if any(error is not None for error, _ in outcomes.values()):
                # A fresh producer (and producer ID) for what follows: after a
                # refusal kafka-python's idempotent producer is unusable.
                self._sender.reset()
            progress.queue = [row for row in progress.queue
                              if row.id not in settled and row.ordering_key not in progress.stopped]
        return progress.batch

    def _next_flight(self, progress: _Progress) -> list[sa.Row[Any]]:
        """Each key's leading run of safe rows; when there are none, the first row that must go alone."""
        wave: list[sa.Row[Any]] = []
        in_wave: set[str] = set()
        solo: sa.Row[Any] | None = None
        closed: set[str] = set()
        for row in progress.queue:
            key = row.ordering_key
            if key in closed:
                continue
            if row.id in progress.suspects or progress.sizes[row.id] > self.proven.get(row.topic, -1):
                # Alone, and only as its key's next row.
                closed.add(key)
                if solo is None and key not in in_wave:
                    solo = row
                continue
            wave.append(row)
            in_wave.add(key)
        # The safe rows first (a refusal among them is unlikely); the
        # next solo row once they are settled, the plan then made anew.
        return wave or ([solo] if solo is not None else [])

    def _settle(self, flight: list[sa.Row[Any]], outcomes: Outcomes, progress: _Progress) -> set[int]:
        """Book each row's outcome in the batch; return the ids not to send again in this batch."""
        batch = progress.batch
        settled: set[int] = set()
        failed_keys: set[str] = set()  # in this flight
        for row in flight:
            if row.id not in outcomes:
                # Not sent: an earlier row of its key was refused at send().
                continue
            error, conclusive = outcomes[row.id]
            settled.add(row.id)
            if error is None:
                if row.ordering_key in failed_keys:
                    log.warning("outbox row %d (message %s to %s) was acknowledged after an earlier row of "
                                "its key failed: that key's order is broken on the topic", row.id,
                                row.message_id, row.topic)
                batch.sent.append(row.id)
                self._prove(row.topic, progress.sizes[row.id])
                continue
            failed_keys.add(row.ordering_key)
            if _kafka.is_refusal(error):
                # The topic's limits may have changed: no row of it is safe
                # until one is acknowledged again.
                self.proven.pop(row.topic, None)
            if not conclusive and (_kafka.is_refusal(error) or _kafka.is_collateral(error)):
                progress.suspects.add(row.id)
                settled.discard(row.id)
            elif _kafka.is_refusal(error):
                batch.refused.append((row, reason(error)))
                progress.stopped.add(row.ordering_key)
            else:
                batch.failed += 1
                batch.failure = batch.failure or error
                progress.stopped.add(row.ordering_key)
        return settled

    def _prove(self, topic: str, row_size: int) -> None:
        if topic not in self.proven and len(self.proven) >= _MAX_PROVEN_TOPICS:
            self.proven.clear()
        self.proven[topic] = max(self.proven.get(topic, -1), row_size)


def reason(error: BaseException) -> str:
    """``Class: detail``; the broker often sends no message, then kafka-python's description of the code."""
    detail = error.args[0] if error.args and error.args[0] is not None else getattr(error, "description", "")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def size(row: sa.Row[Any]) -> int:
    """A row's record size, give or take a constant: key, value, message ID and headers, with their framing."""
    headers = decode_headers(row.headers)
    return (len(row.key or b"") + len(row.value) + len(row.message_id)
            + sum(len(name.encode("utf-8")) + len(data) + 8 for name, data in headers))
