"""How many records a handler's next transaction takes, after lock conflicts.

Both paths (message-ID handlers, ``runtime/dedup.py``, and sequenced ones,
``runtime/ordered.py``) take ``batch_size`` records a transaction until a
transaction of several records loses a lock conflict; then the sizes below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, TypeVar

T = TypeVar("T")

#: Transactions committed in a row at a conflict-reduced size before it grows again.
GROW_AFTER = 8
#: A transaction that loses a lock conflict is retried, and followed, in
#: pieces of this fraction of its size.
SHRINK_BY = 8
#: How long conflicts are remembered: after one, the size grows back only to
#: below the size that lost; after two within this time of each other, it is
#: held; once this much time has passed since the last one, it grows back.
CEILING_S = 30.0


class Sized(Protocol):
    """What the sizing reads of a handler."""

    @property
    def scope(self) -> str: ...

    @property
    def batch_size(self) -> int: ...


class _Conflicts(NamedTuple):
    ceiling: int
    last: float
    losses: int


class ConflictSizing:
    """The records per transaction of each handler scope, as lock conflicts make them.

    ``batch_size``, until a transaction of several records loses a lock
    conflict (a deadlock, a serialization failure, or on PostgreSQL a lock
    wait cut short by ``batch_lock_timeout``): then an eighth
    (:data:`SHRINK_BY`) of the size in force, at once and without retrying
    the same size, so that the next transactions hold fewer row locks for
    less time. (The size in force, not the lost transaction's length: a
    poll's last few records that lose a chance conflict do not cut a large
    batch size down to one.) A handler whose records lock rows in different
    orders deadlocks with other workers at any size above one; each deadlock
    stalls every worker queued on those rows until it is found, so probing
    upwards is what costs. After one conflict, every :data:`GROW_AFTER`
    transactions committed in a row at the reduced size grow it by an eighth
    (at least one record), to below the size that lost. A second conflict
    within :data:`CEILING_S` seconds of the last one is contention, not
    chance: the size is cut again and held. Once :data:`CEILING_S` seconds
    pass without a transaction of several records losing, it grows back
    towards ``batch_size``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Records per transaction per scope, where a lock conflict made it less than ``batch_size``.
        self._sizes: dict[str, int] = {}
        #: Transactions committed in a row at that size, per scope.
        self._streaks: dict[str, int] = {}
        #: Per scope, while conflicts are recent: the smallest size in force that lost, when the
        #: last transaction lost, and how many lost within CEILING_S of the one before.
        self._conflicts: dict[str, _Conflicts] = {}

    def size(self, handler: Sized) -> int:
        """How many records to put in ``handler``'s next transaction."""
        return self._sizes.get(handler.scope, handler.batch_size)

    def lost(self, handler: Sized) -> None:
        """A transaction of several records lost a lock conflict at the size in force."""
        size, now = self.size(handler), self._clock()
        recent = self._recent(handler.scope, now)
        self._conflicts[handler.scope] = (
            _Conflicts(min(recent.ceiling, size), now, recent.losses + 1) if recent else _Conflicts(size, now, 1))
        self._sizes[handler.scope] = max(1, size // SHRINK_BY)
        self._streaks[handler.scope] = 0

    def committed(self, handler: Sized, records: int) -> None:
        """A transaction of ``records`` records committed (one shorter than the size does not count)."""
        size = self._sizes.get(handler.scope)
        if size is None or records < size:
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

    def after_loss(self, handler: Sized, items: list[T]) -> Iterator[list[T]]:
        """A transaction of ``items`` lost a lock conflict: :meth:`lost`, then ``items`` again in consecutive pieces.

        Each piece is of the size in force when it is taken (it may grow
        between pieces); the caller commits each before taking the next.
        """
        self.lost(handler)
        start = 0
        while start < len(items):
            piece = items[start : start + self.size(handler)]
            start += len(piece)
            yield piece

    def _recent(self, scope: str, now: float) -> _Conflicts | None:
        """The scope's conflicts if the last one is less than CEILING_S old (older ones are forgotten)."""
        conflicts = self._conflicts.get(scope)
        if conflicts is not None and now - conflicts.last >= CEILING_S:
            del self._conflicts[scope]
            return None
        return conflicts
