"""Offsets sent without waiting: never ahead of the database, never forgotten unacknowledged."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from exactlyonce._kafka import TopicPartition
from exactlyonce.runtime.offsets import Offsets

P = [TopicPartition("t", n) for n in range(3)]


class Broker:
    """A consumer's commits as the broker sees them; asynchronous answers held until released."""

    def __init__(self) -> None:
        self.committed: dict[TopicPartition, int] = {}
        self.waiting: list[tuple[dict[TopicPartition, int], Callable[[bool], None]]] = []
        self.sync_fails = False

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        if self.sync_fails:
            return False
        self.committed.update(offsets)
        return True

    def commit_async(self, offsets: Mapping[TopicPartition, int], on_done: Callable[[bool], None]) -> None:
        self.waiting.append((dict(offsets), on_done))

    def answer(self, index: int, ok: bool) -> None:
        offsets, on_done = self.waiting.pop(index % len(self.waiting))
        if ok:
            for tp, offset in offsets.items():
                # The broker keeps the latest commit it processed; requests on one
                # connection are processed in order, so a later one is never older.
                self.committed[tp] = max(self.committed.get(tp, 0), offset)
        on_done(ok)


def test_a_mark_is_sent_once_and_forgotten_when_acknowledged() -> None:
    broker, offsets = Broker(), Offsets()
    offsets.mark(P[0], 5)
    offsets.send(broker)
    offsets.send(broker)  # unanswered: not sent again
    assert len(broker.waiting) == 1
    broker.answer(0, ok=True)
    offsets.send(broker)
    assert broker.waiting == [] and broker.committed == {P[0]: 5}


def test_a_failed_commit_is_sent_again() -> None:
    broker, offsets = Broker(), Offsets()
    offsets.mark(P[0], 5)
    offsets.send(broker)
    broker.answer(0, ok=False)
    offsets.send(broker)
    assert [sent for sent, _ in broker.waiting] == [{P[0]: 5}]


def test_revoked_partitions_are_handed_over_and_their_answers_ignored() -> None:
    broker, offsets = Broker(), Offsets()
    offsets.mark(P[0], 5)
    offsets.mark(P[1], 7)
    offsets.send(broker)
    assert offsets.revoke({P[0]}) == {P[0]: 5}
    broker.answer(0, ok=False)
    offsets.send(broker)
    assert [sent for sent, _ in broker.waiting] == [{P[1]: 7}]


actions = st.one_of(
    st.tuples(st.just("mark"), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("send"), st.just(0), st.just(0)),
    st.tuples(st.just("answer"), st.integers(0, 10), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(actions, max_size=60))
def test_commits_never_pass_the_database_and_stopping_commits_every_mark(steps: list[tuple[str, int, object]]) -> None:
    """Whatever the order and fate of the answers, what the broker holds is at most
    what the database holds, and after the final synchronous commit it is exactly that."""
    broker, offsets = Broker(), Offsets()
    in_database: dict[TopicPartition, int] = {}
    for action, a, b in steps:
        if action == "mark":
            tp = P[a]
            in_database[tp] = in_database.get(tp, 0) + int(b)  # type: ignore[call-overload]
            offsets.mark(tp, in_database[tp])
        elif action == "send":
            offsets.send(broker)
        elif broker.waiting:
            broker.answer(a, bool(b))
        for tp, offset in broker.committed.items():
            assert offset <= in_database[tp]
    offsets.commit(broker)
    assert {tp: o for tp, o in broker.committed.items()} == in_database
