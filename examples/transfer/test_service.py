"""The transfer service's tests, written with exactlyonce's test kit: a model for testing your own handlers.

``TestApp`` runs the service's real handler on exactlyonce's real runtime
(claim, handler, dead letters, offsets) with an in-memory broker, one record
at a time, in the test's thread. ``exactlyonce_database_url`` is a fixture of
exactlyonce's pytest plugin: a fresh SQLite file per test here, a PostgreSQL
container when Docker answers, or ``$EXACTLYONCE_TEST_DATABASE_URL``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from exactlyonce.testing import TestApp
from examples.transfer import service
from examples.transfer.models import INSUFFICIENT_FUNDS, accounts, create_schema, transfers


@pytest.fixture
def bank(exactlyonce_database_url: str) -> Iterator[TestApp]:
    """The transfer service under test, with two accounts: acct-a holds 100 cents, acct-b none."""
    with TestApp(service.app, database_url=exactlyonce_database_url) as t:
        create_schema(t.engine)  # the service's own tables; TestApp created exactlyonce's
        with t.engine.begin() as conn:
            conn.execute(sa.insert(accounts), [{"id": "acct-a", "balance": 100}, {"id": "acct-b", "balance": 0}])
        yield t


def balances(t: TestApp) -> dict[str, int]:
    with t.session() as session:
        return {row.id: row.balance for row in session.execute(sa.select(accounts.c.id, accounts.c.balance))}


def test_a_transfer_moves_the_money_once_however_often_it_is_sent(bank: TestApp) -> None:
    transfer = {"transfer_id": "t1", "from": "acct-a", "to": "acct-b", "amount": 30}
    assert bank.send(service.TOPIC, transfer) == "applied"
    assert bank.send(service.TOPIC, transfer) == "duplicate"  # a re-send: skipped by its transfer_id
    assert bank.send(service.TOPIC, transfer, partition=1) == "duplicate"  # on another partition too
    assert balances(bank) == {"acct-a": 70, "acct-b": 30}


def test_an_applied_transfer_publishes_one_event_per_account_through_the_outbox(bank: TestApp) -> None:
    bank.send(service.TOPIC, {"transfer_id": "t1", "from": "acct-a", "to": "acct-b", "amount": 30})
    bank.send(service.TOPIC, {"transfer_id": "t1", "from": "acct-a", "to": "acct-b", "amount": 30})
    debit, credit = bank.published  # once, though the transfer came twice
    assert (debit.topic, debit.key, debit.message_id) == (service.APPLIED_TOPIC, b"acct-a", "t1:debit")
    assert debit.json() == {"account": "acct-a", "seq": 1, "transfer_id": "t1", "direction": "debit",
                            "amount": 30, "balance_after": 70, "counterparty": "acct-b"}
    assert (credit.key, credit.message_id, credit.json()["balance_after"]) == (b"acct-b", "t1:credit", 30)
    assert ("message-id", b"t1:credit") in credit.headers  # what the relay sends with it


def test_an_overdraft_is_recorded_as_rejected_not_dead_lettered(bank: TestApp) -> None:
    # A business outcome: the record is handled (applied), the transfer rejected, nothing published.
    assert bank.send(service.TOPIC, {"transfer_id": "t2", "from": "acct-b", "to": "acct-a", "amount": 1}) == "applied"
    with bank.session() as session:
        row = session.execute(sa.select(transfers.c.status, transfers.c.reason)).one()
    assert tuple(row) == ("rejected", INSUFFICIENT_FUNDS)
    assert balances(bank) == {"acct-a": 100, "acct-b": 0}
    assert bank.published == []
    assert bank.dead_letters == []


def test_malformed_transfers_are_dead_lettered_with_their_reason(bank: TestApp) -> None:
    same_account = {"transfer_id": "t3", "from": "acct-a", "to": "acct-a", "amount": 5}
    assert bank.send(service.TOPIC, same_account) == "dead_lettered"
    assert bank.send(service.TOPIC, b"{not json", key="acct-a") == "dead_lettered"
    assert bank.send(service.TOPIC, {"from": "acct-a", "to": "acct-b", "amount": 5}) == "dead_lettered"
    reasons = [(letter.reason, letter.origin.offset) for letter in bank.dead_letters]
    assert reasons == [("invalid-transfer", 0), ("undecodable-value", 1), ("invalid-message-id", 2)]
    first = bank.dead_letters[0]
    assert first.topic == f"{service.TOPIC}.dlq"
    assert first.json() == same_account
    assert "'from' and 'to' are the same account" in first.error_message
    assert balances(bank) == {"acct-a": 100, "acct-b": 0}
