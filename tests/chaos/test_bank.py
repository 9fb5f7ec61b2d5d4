"""The bank and its ledger under faults: nothing lost, nothing doubled, exactly the bad records dead-lettered.

Transfer workers, standalone outbox relays and ledger workers are all killed,
stopped and cut off at random; every statement must still be numbered 1..N
with one debit and one credit line per applied transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.bank import can_restart_postgres, run_bank


@pytest.mark.service
def test_bank_survives_kills_zombies_db_restarts_and_connection_cuts(
    postgres_url: str, tmp_path: Path
) -> None:
    """About a minute of random faults (seeded) ends with every transfer applied exactly once, and in the ledger."""
    if os.environ.get("CI") == "true":
        assert can_restart_postgres(postgres_url), "CI must exercise PostgreSQL restarts"
    report = run_bank(
        duration_s=float(os.environ.get("CHAOS_DURATION", 45)),
        seed=int(os.environ.get("CHAOS_SEED", 1)),
        database_url=postgres_url,
        log_dir=tmp_path,
    )
    assert report.transfers > 1000
    assert sum(report.faults.values()) >= 5
    assert report.bad_sent > 0
    assert report.ledger_lines > 2000 and report.ledger_lines == report.events
    assert report.ok, report.summary()
