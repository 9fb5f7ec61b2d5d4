"""The ledger service's tests, written with exactlyonce's test kit: a model for testing sequenced handlers.

The last test chains both services: what the transfer service published
through its outbox is fed to the ledger, as the relay and Kafka would carry
it, in a bad order, and the ledger's statements come out right.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from exactlyonce.testing import TestApp
from examples.ledger import service as ledger
from examples.ledger.models import create_schema, statement_lines
from examples.ledger.verify import verify_ledger
from examples.transfer import models as bank_models
from examples.transfer import service as transfer


def event(account: str, seq: int, amount: int = 10, balance_after: int = 10) -> dict[str, Any]:
    return {"account": account, "seq": seq, "transfer_id": f"t{seq}", "direction": "credit",
            "amount": amount, "balance_after": balance_after, "counterparty": "acct-z"}


@pytest.fixture
def statements(exactlyonce_database_url: str) -> Iterator[TestApp]:
    """The ledger service under test, with its table."""
    with TestApp(ledger.app, database_url=exactlyonce_database_url) as t:
        create_schema(t.engine)
        yield t


def lines(t: TestApp, account: str) -> list[tuple[int, str]]:
    with t.session() as session:
        return [(row.line, row.transfer_id) for row in session.execute(
            sa.select(statement_lines.c.line, statement_lines.c.transfer_id)
            .where(statement_lines.c.account == account).order_by(statement_lines.c.line))]


def test_an_early_event_is_parked_until_the_ones_before_it_arrive(statements: TestApp) -> None:
    assert statements.send(ledger.TOPIC, event("acct-a", 2)) == "parked"
    assert lines(statements, "acct-a") == []
    assert statements.send(ledger.TOPIC, event("acct-a", 1)) == "applied"  # and 2 is released behind it
    assert lines(statements, "acct-a") == [(1, "t1"), (2, "t2")]
    released = [d.outcome for d in statements.decisions if d.number == 2]
    assert released == ["parked", "applied"]


def test_a_re_sent_event_is_a_duplicate(statements: TestApp) -> None:
    assert statements.send(ledger.TOPIC, event("acct-a", 1)) == "applied"
    assert statements.send(ledger.TOPIC, event("acct-a", 1), partition=2) == "duplicate"
    assert lines(statements, "acct-a") == [(1, "t1")]


def test_a_malformed_event_is_dead_lettered(statements: TestApp) -> None:
    assert statements.send(ledger.TOPIC, {"account": "acct-a", "seq": 0}) == "dead_lettered"
    (letter,) = statements.dead_letters
    assert (letter.reason, letter.topic) == ("invalid-event", f"{ledger.TOPIC}.dlq")


def test_the_transfer_services_events_make_the_ledgers_statements(exactlyonce_database_url: str) -> None:
    seeded = {"acct-a": 100, "acct-b": 100, "acct-c": 0}
    with TestApp(transfer.app, database_url=exactlyonce_database_url) as bank:
        bank_models.create_schema(bank.engine)
        with bank.engine.begin() as conn:
            conn.execute(sa.insert(bank_models.accounts), [{"id": k, "balance": v} for k, v in seeded.items()])
        for n, (source, target, amount) in enumerate([("acct-a", "acct-c", 30), ("acct-b", "acct-c", 50),
                                                       ("acct-c", "acct-a", 60), ("acct-a", "acct-b", 1)]):
            assert bank.send(transfer.TOPIC, {"transfer_id": f"t{n}", "from": source, "to": target,
                                              "amount": amount}) == "applied"
        published = bank.published
    assert len(published) == 8
    with TestApp(ledger.app, database_url=exactlyonce_database_url) as statements:
        create_schema(statements.engine)
        # Last first, and the first one twice: as a relay re-sending a batch could deliver them.
        for record in [*reversed(published), published[0]]:
            statements.send(record.topic, record.value, key=record.key, headers=record.headers)
        assert statements.outcomes.count("duplicate") == 1
        result = verify_ledger(statements.engine, initial_balances=seeded,
                               scope=ledger.app.handlers[ledger.TOPIC].scope)
        assert result.ok, result.problems
        assert lines(statements, "acct-c") == [(1, "t0"), (2, "t1"), (3, "t2")]
