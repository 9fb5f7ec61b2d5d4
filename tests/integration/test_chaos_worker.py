"""The chaos bank's transfer worker (tests/chaos/service.py), both variants, without the chaos.

``tests/chaos`` restarts shared services and runs for minutes; this runs the
same worker process (``exactlyonce run tests.chaos.service:app``, with its
``def`` handler and with its ``async def`` one) on a few transfers, re-sent
copies and a poison record, and checks what the bank's checker checks: each
transfer applied once (one journal row), its two statement entries in the
outbox, the poison dead-lettered, money conserved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from exactlyonce.schema import outbox
from examples.transfer import models
from examples.transfer.producer import make_transfers
from tests.chaos.bank import ASYNC_HANDLER_ENV, INITIAL_BALANCE, _prepare_database, journal
from tests.conftest import drop_all_tables

from .helpers import (
    Rec,
    create_topic,
    headers_of,
    process,
    produce,
    read_topic,
    unique,
    wait_all_committed,
)

pytestmark = pytest.mark.service

ACCOUNTS = 6


def test_the_chaos_transfer_worker_applies_each_transfer_once(
    bootstrap_servers: str, postgres_url: str, handler_kind: str, tmp_path: Path
) -> None:
    drop_all_tables(postgres_url)
    engine, balances = _prepare_database(postgres_url, ACCOUNTS)
    assert sum(balances.values()) == ACCOUNTS * INITIAL_BALANCE
    topic, group, applied_topic = unique("chaos-t"), unique("chaos-g"), unique("chaos-applied")
    create_topic(bootstrap_servers, topic, partitions=2)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    transfers = make_transfers(20, ACCOUNTS, seed=unique("s"), unknown_share=0)
    records = [Rec(value=json.dumps(t).encode(), partition=n % 2) for n, t in enumerate(transfers)]
    resent = [Rec(value=json.dumps(t).encode(), partition=(n + 1) % 2) for n, t in enumerate(transfers[:5])]
    poison = Rec(value=json.dumps({"transfer_id": "poison-1", "poison": True}).encode(), partition=0)
    produce(bootstrap_servers, topic, [*records, poison, *resent])
    env = {
        "EXACTLYONCE_BOOTSTRAP_SERVERS": bootstrap_servers,
        "EXACTLYONCE_DATABASE_URL": postgres_url,
        "CHAOS_TOPIC": topic,
        "CHAOS_GROUP": group,
        "CHAOS_CONSUMER_CONFIG": json.dumps({"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}),
        ASYNC_HANDLER_ENV: "1" if handler_kind == "async" else "",
        "EXACTLYONCE_TRANSFER_APPLIED_TOPIC": applied_topic,
    }
    argv = [sys.executable, "-m", "exactlyonce", "run", "tests.chaos.service:app"]
    with process(argv, tmp_path / "worker.log", **env) as worker:
        try:
            wait_all_committed(bootstrap_servers, group, topic, timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log_tail()}") from None
        assert worker.terminate() == 0, worker.log_tail()
        ran_async = f"async def handlers ({topic}) run on the worker's event loop" in worker.log_tail(100_000)
        assert ran_async == (handler_kind == "async"), worker.log_tail()

    with engine.connect() as conn:
        journal_rows = conn.execute(sa.select(journal.c.transfer_id)).scalars().all()
        statuses = dict(conn.execute(sa.select(models.transfers.c.transfer_id, models.transfers.c.status)).all())
        money_after = conn.execute(sa.select(sa.func.sum(models.accounts.c.balance))).scalar_one()
        entries = conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one()
    ids = [t["transfer_id"] for t in transfers]
    assert sorted(journal_rows) == sorted(ids), "each transfer applied exactly once"
    assert set(statuses) == set(ids)
    applied = sum(1 for status in statuses.values() if status == models.APPLIED)
    assert entries == 2 * applied, "a debit and a credit entry per applied transfer, in the outbox"
    assert money_after == ACCOUNTS * INITIAL_BALANCE
    (letter,) = read_topic(bootstrap_servers, f"{topic}.dlq")
    assert headers_of(letter)["x-exactlyonce-reason"] == "handler-error"
    assert "poison transfer poison-1" in headers_of(letter)["x-exactlyonce-error-message"]
    engine.dispose()
