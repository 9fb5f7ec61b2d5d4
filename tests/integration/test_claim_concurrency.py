"""Two transactions claiming the same message ID at once: the second waits for the first."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.orm import Session

from exactlyonce import Claim, Message, claim

from .helpers import dedup_rows, engine_for

SCOPE = "concurrency:topic"
MESSAGE_ID = "order-42"
#: How long the first transaction holds the claim while the second must wait.
HOLD_S = 0.5


def _message(offset: int) -> Message:
    return Message(topic="topic", partition=offset, offset=offset, key=None, value=b"payload")


@pytest.mark.parametrize("first_ends_with", ["commit", "rollback"])
def test_second_claim_waits_for_the_first_transaction(database_url: str, first_ends_with: str) -> None:
    """The second claim blocks until the first transaction ends: DUPLICATE after a commit, NEW after a rollback."""
    engine = engine_for(database_url)
    second_started = threading.Event()
    result: dict[str, object] = {}

    def second() -> None:
        try:
            with Session(engine) as session, session.begin():
                second_started.set()
                result["claim"] = claim(session, SCOPE, MESSAGE_ID, _message(offset=2))
                result["returned_at"] = time.monotonic()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=second, daemon=True)
    with Session(engine) as first:
        first.begin()
        assert claim(first, SCOPE, MESSAGE_ID, _message(offset=1)) is Claim.NEW
        thread.start()
        assert second_started.wait(10)
        time.sleep(HOLD_S)
        still_waiting = thread.is_alive() and "returned_at" not in result
        first_ended_at = time.monotonic()
        if first_ends_with == "commit":
            first.commit()
        else:
            first.rollback()
    thread.join(40)

    assert not thread.is_alive(), "the second claim never returned"
    assert "error" not in result, result.get("error")
    assert still_waiting, f"the second claim returned {result.get('claim')} while the first held the ID"
    assert result["returned_at"] >= first_ended_at  # type: ignore[operator]
    expected = Claim.DUPLICATE if first_ends_with == "commit" else Claim.NEW
    assert result["claim"] is expected
    # Exactly one row, owned by whichever transaction committed.
    rows = dedup_rows(engine, SCOPE)
    assert [(r.message_id, r.kafka_offset) for r in rows] == [
        (MESSAGE_ID, 1 if first_ends_with == "commit" else 2)]
    engine.dispose()
