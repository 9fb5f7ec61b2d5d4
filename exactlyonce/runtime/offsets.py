"""Offsets to commit: only what the database holds, sent without waiting.

A partition's offset is marked done when the transaction of its records has
committed. After each poll batch the new marks are sent as one asynchronous
offset commit: the worker goes on with the next batch while the broker
answers (a synchronous commit is one round trip per batch, about a tenth of
the time of a 500-record batch on a two-core machine). A mark is forgotten
only when the broker acknowledged it; one that failed is sent again with
the next commit. A commit that never arrives costs redelivery, never a
loss: the next owner of the partition receives those records again and the
dedup store skips them. Stopping commits synchronously.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping
from typing import Protocol

from exactlyonce._kafka import TopicPartition

_Offsets = Mapping[TopicPartition, int]


class Committer(Protocol):
    """The consumer's side of it (``exactlyonce._kafka.Consumer``)."""

    def commit(self, offsets: _Offsets) -> bool: ...  # pragma: no cover - a protocol

    def commit_async(
        self, offsets: _Offsets, on_done: Callable[[bool], None] | None = None
    ) -> None: ...  # pragma: no cover - a protocol


class Offsets:
    """The next offset to commit per partition: everything below it is in the database."""

    def __init__(self) -> None:
        self._done: dict[TopicPartition, int] = {}
        #: Marks sent and not answered yet (not sent again meanwhile).
        self._sent: dict[TopicPartition, int] = {}
        #: Answers of asynchronous commits, put by the client's I/O thread.
        self._answers: queue.SimpleQueue[tuple[dict[TopicPartition, int], bool]] = queue.SimpleQueue()

    def mark(self, tp: TopicPartition, offset: int) -> None:
        """Records below ``offset`` of ``tp`` are committed in the database."""
        self._done[tp] = offset

    def send(self, consumer: Committer) -> None:
        """Commit, without waiting, the marks not sent yet (or whose commit failed)."""
        self._settle()
        offsets = {tp: offset for tp, offset in self._done.items() if self._sent.get(tp) != offset}
        if not offsets:
            return
        self._sent.update(offsets)
        consumer.commit_async(offsets, on_done=lambda ok: self._answers.put((offsets, ok)))

    def commit(self, consumer: Committer) -> None:
        """Commit every mark and wait for the answer (on stopping)."""
        self._settle()
        offsets = dict(self._done)
        if offsets and consumer.commit(offsets):
            self._forget(offsets)

    def revoke(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Take the marks of partitions leaving this member (for a last commit of theirs)."""
        for tp in partitions:
            self._sent.pop(tp, None)
        return {tp: self._done.pop(tp) for tp in partitions if tp in self._done}

    def _settle(self) -> None:
        while True:
            try:
                offsets, ok = self._answers.get_nowait()
            except queue.Empty:
                return
            if ok:
                self._forget(offsets)
            else:
                # Sent again by the next send(), unless a later mark superseded it.
                for tp, offset in offsets.items():
                    if self._sent.get(tp) == offset:
                        del self._sent[tp]

    def _forget(self, offsets: _Offsets) -> None:
        for tp, offset in offsets.items():
            if self._done.get(tp) == offset:
                del self._done[tp]
            if self._sent.get(tp) == offset:
                del self._sent[tp]
