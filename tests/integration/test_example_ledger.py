"""The examples end to end: transfers publish statement entries through the outbox, the ledger orders them.

- the transfer handler, called directly, publishes one event per account side
  of an applied transfer (none for a rejected one), numbered by the account's
  entry counter, in its own transaction;
- the ledger handler, called directly, writes the next line and refuses any
  other; the ledger verification passes on a consistent history and catches a
  missing line, a doubled line, a renumbered line and a wrong balance;
- the ledger App, on the real broker, turns reordered and duplicated events
  spread over partitions into gap-free statements (``sequence=``);
- the demo (transfer workers + their relays + ledger workers, duplicates, a
  worker of each service SIGKILLed) verifies on PostgreSQL and on SQLite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import Message, MessageError
from exactlyonce.schema import outbox, parked, sequence_streams
from examples.ledger import models as ledger_models
from examples.ledger.service import OutOfOrder, account_and_seq, add_statement_line
from examples.ledger.verify import verify_ledger
from examples.transfer import models
from examples.transfer.service import APPLIED_TOPIC, apply_transfer

from .helpers import REPO_ROOT, Rec, create_topic, engine_for, make_app, produce, running, unique, wait_until

BALANCE = 1_000


def _prepare(engine: sa.Engine, accounts: int = 3) -> dict[str, int]:
    models.create_schema(engine)
    ledger_models.create_schema(engine)
    return models.seed_accounts(engine, accounts, BALANCE)


def _message(value: dict[str, Any], offset: int = 0, topic: str = "t", partition: int = 0) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=None,
                   value=json.dumps(value, sort_keys=True).encode())


def _transfer(n: int, source: int, target: int, amount: int) -> Message:
    return _message({"transfer_id": f"t-{n}", "from": models.account_id(source),
                     "to": models.account_id(target), "amount": amount}, offset=n)


def _apply(engine: sa.Engine, message: Message) -> str:
    with Session(engine) as session, session.begin():
        return apply_transfer(message, session)


def _events(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(outbox).order_by(outbox.c.id)).all())


def _lines(engine: sa.Engine) -> list[tuple[str, int, str, str, int]]:
    t = ledger_models.statement_lines
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(  # type: ignore[misc]
            sa.select(t.c.account, t.c.line, t.c.transfer_id, t.c.direction, t.c.balance_after)
            .order_by(t.c.account, t.c.line))]


def _add_line(engine: sa.Engine, value: dict[str, Any]) -> None:
    with Session(engine) as session, session.begin():
        add_statement_line(_message(value), session)


def test_applied_transfer_publishes_one_numbered_event_per_side(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        _prepare(engine)
        assert _apply(engine, _transfer(1, 0, 1, 300)) == models.APPLIED
        assert _apply(engine, _transfer(2, 1, 2, 50)) == models.APPLIED
        assert _apply(engine, _transfer(3, 2, 0, 10 * BALANCE)) == models.REJECTED  # too little money
        events = _events(engine)
        assert [(row.topic, row.key, row.message_id) for row in events] == [
            (APPLIED_TOPIC, b"acct-0000", "t-1:debit"),
            (APPLIED_TOPIC, b"acct-0001", "t-1:credit"),
            (APPLIED_TOPIC, b"acct-0001", "t-2:debit"),
            (APPLIED_TOPIC, b"acct-0002", "t-2:credit"),
        ]
        assert json.loads(events[2].value) == {
            "account": "acct-0001", "seq": 2, "transfer_id": "t-2", "direction": "debit",
            "amount": 50, "balance_after": BALANCE + 300 - 50, "counterparty": "acct-0002",
        }
        assert [json.loads(row.value)["seq"] for row in events] == [1, 1, 2, 1]
        with engine.connect() as conn:
            entries = dict(conn.execute(sa.select(models.accounts.c.id, models.accounts.c.entries)).all())
        assert entries == {"acct-0000": 1, "acct-0001": 2, "acct-0002": 1}
    finally:
        engine.dispose()


def test_a_rolled_back_transfer_publishes_nothing(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        _prepare(engine)
        with Session(engine) as session:
            session.begin()
            apply_transfer(_transfer(1, 0, 1, 300), session)
            session.rollback()
        assert _events(engine) == []
        assert models.balances(engine) == {"acct-0000": BALANCE, "acct-0001": BALANCE, "acct-0002": BALANCE}
    finally:
        engine.dispose()


def test_ledger_handler_writes_only_the_next_line(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        _prepare(engine)
        event = {"account": "acct-0000", "seq": 1, "transfer_id": "t-1", "direction": "debit",
                 "amount": 10, "balance_after": 990, "counterparty": "acct-0001"}
        _add_line(engine, event)
        with pytest.raises(OutOfOrder):
            _add_line(engine, {**event, "seq": 3, "transfer_id": "t-3"})
        with pytest.raises(OutOfOrder):
            _add_line(engine, {**event, "seq": 1, "transfer_id": "t-1 again"})
        _add_line(engine, {**event, "seq": 2, "transfer_id": "t-2", "balance_after": 980})
        assert _lines(engine) == [("acct-0000", 1, "t-1", "debit", 990), ("acct-0000", 2, "t-2", "debit", 980)]
        for bad in ({**event, "seq": 0}, {**event, "seq": True}, {**event, "direction": "sideways"},
                    {k: v for k, v in event.items() if k != "account"}):
            with pytest.raises(MessageError):
                account_and_seq(_message(bad))
    finally:
        engine.dispose()


def test_ledger_verification_passes_on_a_consistent_history_and_catches_tampering(database_url: str) -> None:
    engine = engine_for(database_url)
    t = ledger_models.statement_lines
    try:
        initial = _prepare(engine, accounts=4)
        moves = [(0, 1, 300), (1, 2, 500), (2, 3, 700), (3, 0, 100), (0, 2, 5_000), (2, 1, 40)]
        statuses = [_apply(engine, _transfer(n, *move)) for n, move in enumerate(moves)]
        assert statuses.count(models.REJECTED) == 1
        for row in _events(engine):  # the relay's order: the outbox's
            _add_line(engine, json.loads(row.value))
        result = verify_ledger(engine, initial_balances=initial)
        assert result.ok, result.problems
        assert result.lines == 2 * statuses.count(models.APPLIED)

        def broken(change: sa.Executable) -> list[str]:
            with engine.begin() as conn:
                conn.execute(change)
            result = verify_ledger(engine, initial_balances=initial)
            with engine.begin() as conn:  # back to the consistent history
                conn.execute(sa.delete(t))
            for row in _events(engine):
                _add_line(engine, json.loads(row.value))
            assert not result.ok
            return result.problems

        missing = broken(sa.delete(t).where(t.c.account == "acct-0002", t.c.line == 2))
        assert any("no credit line" in p or "no debit line" in p for p in missing)
        assert any("acct-0002: lines 1, 3" in p for p in missing)
        doubled = broken(sa.insert(t).from_select(
            [c.name for c in t.c],
            sa.select(t.c.account, t.c.line + 100, *[t.c[n] for n in
                      ("transfer_id", "direction", "amount", "balance_after", "counterparty")])
            .where(t.c.account == "acct-0001", t.c.line == 1)))
        assert any("2 credit lines" in p for p in doubled)
        renumbered = broken(sa.update(t).where(t.c.account == "acct-0003", t.c.line == 2).values(line=7))
        assert any("acct-0003: lines 1, 7" in p for p in renumbered)
        wrong = broken(sa.update(t).where(t.c.account == "acct-0000", t.c.line == 1).values(balance_after=1))
        assert any("acct-0000: line 1 says 1" in p for p in wrong)
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_ledger_app_orders_reordered_and_duplicated_events(bootstrap_servers: str, database_url: str) -> None:
    """Each account's events arrive backwards, on all partitions, some twice: the statements come out 1..6."""
    topic = unique("applied")
    create_topic(bootstrap_servers, topic, partitions=3)
    engine = engine_for(database_url)
    try:
        _prepare(engine)
        histories = {
            account: [{"account": account, "seq": seq, "transfer_id": f"{account}-t{seq}", "direction": "credit",
                       "amount": 1, "balance_after": BALANCE + seq, "counterparty": "acct-0099"}
                      for seq in range(1, 7)]
            for account in ("acct-0000", "acct-0001")
        }
        records = []
        for account, events in histories.items():
            for event in [*reversed(events), events[1], events[4]]:  # backwards, then two duplicates
                records.append(Rec(value=json.dumps(event, sort_keys=True).encode(), key=account.encode(),
                                   message_id=f"{event['transfer_id']}:credit",
                                   partition=(event["seq"] + len(records)) % 3))
        produce(bootstrap_servers, topic, records)

        app = make_app(bootstrap_servers, database_url, outbox=False)
        app.handler(topic, sequence=account_and_seq)(add_statement_line)
        scope = app.handlers[topic].scope
        with running(app):
            wait_until(lambda: len(_lines(engine)) >= 12, 60, "12 statement lines")
            wait_until(lambda: app.stats["duplicate"] >= 4, 30, "the 4 duplicates to be skipped")
        assert _lines(engine) == [
            (account, seq, f"{account}-t{seq}", "credit", BALANCE + seq)
            for account in histories for seq in range(1, 7)
        ]
        assert app.stats["applied"] == 12
        with engine.connect() as conn:
            watermarks = dict(conn.execute(sa.select(sequence_streams.c.stream, sequence_streams.c.watermark)
                                           .where(sequence_streams.c.scope == scope)).all())
            still_parked = conn.execute(sa.select(sa.func.count()).select_from(parked)
                                        .where(parked.c.scope == scope)).scalar_one()
        assert watermarks == {"acct-0000": 6, "acct-0001": 6}
        assert still_parked == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_demo_verifies_both_services_through_duplicates_and_kills(
    bootstrap_servers: str, database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The demo on the test broker: transfer workers relaying the outbox, ledger workers, one of each killed."""
    env = {key: value for key, value in os.environ.items() if key != "EXACTLYONCE_DATABASE_URL"}
    env["EXACTLYONCE_BOOTSTRAP_SERVERS"] = bootstrap_servers  # the demo then suffixes its topics and groups
    if database == "postgresql":
        env["EXACTLYONCE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    # 100 transfers/s over 6 s: the workers have joined well before the kill points.
    demo = subprocess.run(
        [sys.executable, "-m", "examples.transfer.demo", "--count", "600", "--rate", "100",
         "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out
    assert "SIGKILLed transfer-1" in out and "SIGKILLed ledger-1" in out, out
    assert "\nverified: 600 transfers applied once" in out, out
    assert "\nledger verified: " in out and " 0 missing, 0 doubled;" in out, out
    assert "duplicates skipped, 0 lost, 0 doubled, money conserved" in out, out
