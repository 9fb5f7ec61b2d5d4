"""The transactional outbox: publish inside a database transaction, relay to Kafka after it commits.

A record sent to Kafka from a handler goes out even if the handler's
transaction then rolls back. :func:`publish` instead stores the record in
``exactlyonce_outbox`` through the caller's session, so it exists if and only
if the caller's transaction commits. A :class:`Relay` sends the pending rows:

1. in ONE database transaction, lock the oldest pending rows that are not
   refused and whose topic and key has no refused row (``FOR UPDATE SKIP
   LOCKED``, so concurrent relays take different rows; on SQLite ``BEGIN
   IMMEDIATE`` serialises the relays instead);
2. hold back every row that an earlier pending row of its topic and key
   precedes outside this batch (another relay holds it, or the broker refused
   it): sending ours first would overtake it;
3. send the rest in ``id`` order: rows no larger than one the broker already
   took on their topic go together, each key's run of them in order; a row
   that could be refused for its size goes alone, and its key's later rows
   wait for its outcome (kafka-python's idempotent producer fails every
   record in flight after a refusal). A row that fails stops its key for the
   rest of the batch: no later row of that key can overtake it;
4. in the same transaction, set ``sent_at`` on every acknowledged row (also
   when other rows of the batch failed), and ``refused_at``/``refusal`` on
   every row the broker refused for good (too large, topic invalid or not
   authorised); commit. The refused row and the later rows of its key then
   wait until an operator releases (:func:`release`) or discards
   (:func:`discard`) it. Rows that failed otherwise (broker unavailable, a
   timeout) stay pending and are tried again, after a backoff.

A relay that dies between (3) and (4) leaves its rows pending, and they are
sent again: delivery is at-least-once, each copy with the row's stable
``message-id`` header, so an exactlyonce consumer applies it once.

The package, one room per job:

- :mod:`~exactlyonce.outbox.publishing`: :func:`publish`, and the row's
  format (its ordering key, its headers);
- :mod:`~exactlyonce.outbox.rows`: the relay's SQL: which rows a batch may
  send (1, 2), marking them sent or refused (4), the backlog counts;
- :mod:`~exactlyonce.outbox.dispatch`: the order of the sends (3): which
  rows go together in a flight, which alone, which wait;
- :mod:`~exactlyonce.outbox.sender`: the Kafka side: one flight of sends,
  the bounded and cancellable wait for its acknowledgements, the producer;
- :mod:`~exactlyonce.outbox.relay`: :class:`Relay` (one batch, 1 to 4, in
  one transaction) and :class:`RelayThread`;
- :mod:`~exactlyonce.outbox.loop`: batch after batch until stopped, with
  backoff, pruning and the backlog gauge;
- :mod:`~exactlyonce.outbox.refusals`: listing, releasing and discarding
  refused rows;
- :mod:`~exactlyonce.outbox.table`: pruning sent rows, checking the table's
  revision.

``exactlyonce.outbox`` re-exports their public names, so code written when
the outbox was one module imports them from here as before.
"""

from exactlyonce import _kafka as _kafka  # the seam the relay's producer comes from (tests replace it)
from exactlyonce.outbox.loop import BACKLOG_INTERVAL, DEFAULT_RETENTION, PRUNE_INTERVAL, OutboxMetrics
from exactlyonce.outbox.publishing import decode_headers, publish
from exactlyonce.outbox.refusals import RefusedRow, discard, refused, release
from exactlyonce.outbox.relay import Relay, RelayThread
from exactlyonce.outbox.rows import MAX_REFUSAL_LENGTH
from exactlyonce.outbox.sender import FLUSH_LIMIT
from exactlyonce.outbox.table import missing_columns, prune, require_columns

# The single module's private names that tests import.
_decode_headers = decode_headers

__all__ = [
    "BACKLOG_INTERVAL",
    "DEFAULT_RETENTION",
    "FLUSH_LIMIT",
    "MAX_REFUSAL_LENGTH",
    "PRUNE_INTERVAL",
    "OutboxMetrics",
    "RefusedRow",
    "Relay",
    "RelayThread",
    "discard",
    "missing_columns",
    "prune",
    "publish",
    "refused",
    "release",
    "require_columns",
]
