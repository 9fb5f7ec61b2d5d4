"""The relay's Kafka side: one flight of sends, and the bounded, cancellable wait for its acknowledgements.

A :class:`Sender` owns the relay's producer: it is created when first
needed, and replaced after any failure (kafka-python's idempotent producer is
unusable after a refusal). Each record carries its row's stable
``message-id`` header (and a signature when a signing key is set, made at
send time). Waiting for a flight's outcomes is bounded by :data:`FLUSH_LIMIT`
and ends at once when a stop is requested: what is not acknowledged then
stays pending and is sent again later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from exactlyonce import _kafka
from exactlyonce.errors import TransientError
from exactlyonce.outbox.publishing import decode_headers
from exactlyonce.producer import stamp_headers
from exactlyonce.signing import SigningKey

log = logging.getLogger("exactlyonce")

#: How often a flush checks whether a stop was requested.
_CANCEL_CHECK_S = 0.1
#: The longest a relay waits for one flight's acknowledgements before it
#: gives up on them (they stay pending) and starts over with a new producer.
FLUSH_LIMIT = timedelta(seconds=30)

#: Per row id: ``None`` if acknowledged, else the error; and whether that outcome is conclusive.
Outcomes = dict[int, tuple[BaseException | None, bool]]


class Sender:
    """Sends flights of outbox rows to Kafka through one producer at a time."""

    def __init__(
        self, bootstrap_servers: str, producer_config: Mapping[str, Any], signing_key: SigningKey | None
    ) -> None:
        self._servers = bootstrap_servers
        self._producer_config = dict(producer_config)
        self._signing_key = signing_key
        self._producer: _kafka.RecordProducer | None = None
        #: Set while :meth:`Relay.run <exactlyonce.outbox.Relay.run>` runs: a stop request ends a flush at
        #: once (the rows not yet acknowledged stay pending and are sent again later).
        self.cancel: threading.Event | None = None

    def producer(self) -> _kafka.RecordProducer:
        """The current producer, created if there is none (raises what creating it raises)."""
        if self._producer is None:
            # No re-send rounds beyond kafka-python's own (idempotent, in
            # order): a record that failed is not re-sent behind the later
            # records of its partition; it stays pending for the next batch.
            self._producer = _kafka.RecordProducer(bootstrap_servers=self._servers, config=self._producer_config)
        return self._producer

    def reset(self) -> None:
        """Close the current producer, if any: the next flight gets a new one (and a new producer ID)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                # Stopping: nothing it still holds is waited for (those rows stay pending).
                producer.close(0.0 if self._stopping() else 10.0)
            except Exception as exc:
                log.debug("closing the relay's producer: %s", exc)

    def send_flight(self, rows: Sequence[sa.Row[Any]], unreachable: set[str]) -> Outcomes:
        """Send ``rows``, wait for every outcome: row id -> (None if acknowledged else the error, conclusive).

        An outcome is conclusive when no other record was in flight with it
        (or it failed before it was queued): another record's refusal cannot
        have caused it. A row refused before it was queued stops the later
        rows of its key in the flight (they are left out of the result); one
        that could not be queued for another reason (no metadata for its
        topic within ``max_block_ms``) fails the rest of its topic at once,
        here and in the later flights of the batch (``unreachable``, the
        topics so failed, is updated), instead of waiting for each.
        """
        producer = self.producer()
        outcomes: Outcomes = {}
        halted: set[str] = set()
        queued: list[tuple[sa.Row[Any], Any]] = []
        for row in rows:
            if row.ordering_key in halted:
                continue
            if row.topic in unreachable:
                outcomes[row.id] = (TransientError(f"topic {row.topic!r} unavailable earlier in this batch"), True)
                halted.add(row.ordering_key)
                continue
            headers = stamp_headers(row.message_id, row.key, row.value, decode_headers(row.headers),
                                    self._signing_key)
            future = producer.send(row.topic, key=row.key, value=row.value, headers=headers)
            if future.is_done and not future.succeeded():
                error = producer.outcome(future)
                outcomes[row.id] = (error, True)
                halted.add(row.ordering_key)
                if error is not None and not _kafka.is_refusal(error):
                    unreachable.add(row.topic)
                continue
            queued.append((row, future))
        self._flush(producer, [future for _, future in queued])
        for row, future in queued:
            outcomes[row.id] = (producer.outcome(future), len(queued) == 1)
        return outcomes

    def _flush(self, producer: _kafka.RecordProducer, futures: list[Any]) -> None:
        """Wait for every future's outcome, for at most FLUSH_LIMIT or until a stop is requested.

        The futures still open then report a timeout: their rows stay pending,
        and the failure gives the relay a new producer. Bounded because
        kafka-python's futures were seen never to complete after every broker
        of a cluster had been restarted (the relay then waited for good).
        """
        deadline = time.monotonic() + FLUSH_LIMIT.total_seconds()
        while not all(future.is_done for future in futures):
            if self._stopping() or time.monotonic() >= deadline:
                return
            producer.flush(_CANCEL_CHECK_S)

    def _stopping(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()
