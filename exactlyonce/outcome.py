"""Every outcome a record can have, and where each one is counted.

A record polled by a worker ends in exactly one of :attr:`Outcome.APPLIED`,
:attr:`~Outcome.DUPLICATE`, :attr:`~Outcome.SKIPPED`,
:attr:`~Outcome.DEAD_LETTERED` or :attr:`~Outcome.PARKED` (a sequenced record
ahead of its turn; it is applied or dead-lettered later, and counted again
then). :attr:`~Outcome.FINGERPRINT_MISMATCH` is booked *besides* the final
outcome of a record whose ID (or sequence number) was seen with another
payload: it ends dead-lettered, or a duplicate under
``on_fingerprint_mismatch="skip"``.

Each booking reaches four places, all from one call
(:meth:`exactlyonce.runtime.booking.Book.add`): the ``exactlyonce_counters``
row of the record's partition (in the deciding transaction), the runner's
``stats``, the ``exactlyonce_messages_total`` metric and the decision's log
line (both after the commit).
"""

from __future__ import annotations

import enum

__all__ = ["Outcome"]


class Outcome(enum.StrEnum):
    """What became of a record; the value is the ``outcome`` metric label and ``stats`` key."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    DEAD_LETTERED = "dead_lettered"
    PARKED = "parked"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"

    @property
    def column(self) -> str:
        """The ``exactlyonce_counters`` column that counts this outcome."""
        return _COLUMNS[self]


_COLUMNS = {
    Outcome.APPLIED: "applied",
    Outcome.DUPLICATE: "duplicates",
    Outcome.SKIPPED: "skipped",
    Outcome.DEAD_LETTERED: "dead_lettered",
    Outcome.PARKED: "parked",
    Outcome.FINGERPRINT_MISMATCH: "fingerprint_mismatches",
}
