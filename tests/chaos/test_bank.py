"""The bank and its ledger under faults: nothing lost, nothing doubled, exactly the bad records dead-lettered.

Transfer workers, standalone outbox relays and ledger workers are all killed,
stopped and cut off at random; every statement must still be numbered 1..N
with one debit and one credit line per applied transfer. The second test runs
the same with an async def transfer handler; the third runs the bank on a
three-node Apache Kafka cluster and kills its brokers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.bank import BROKER_FAULTS, can_restart_postgres, run_bank
from tests.services.kafka import KafkaCluster


@pytest.mark.service
@pytest.mark.timeout(900)
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


@pytest.mark.service
@pytest.mark.timeout(900)
def test_bank_with_async_transfer_handlers_survives_the_same_faults(postgres_url: str, tmp_path: Path) -> None:
    """The same bank with an async def transfer handler (each worker's event loop, psycopg's async mode)."""
    report = run_bank(
        duration_s=float(os.environ.get("CHAOS_DURATION", 45)),
        seed=int(os.environ.get("CHAOS_SEED", 1)),
        database_url=postgres_url,
        log_dir=tmp_path,
        async_handler=True,
    )
    assert report.handler == "async"
    assert report.transfers > 1000
    assert sum(report.faults.values()) >= 5
    assert report.bad_sent > 0
    assert report.ledger_lines > 2000 and report.ledger_lines == report.events
    assert report.ok, report.summary()


@pytest.mark.service
@pytest.mark.timeout(1200)  # 120 s of faults, then the catch-up and the checks
def test_bank_on_a_three_broker_cluster_survives_leader_and_coordinator_loss_and_full_restarts(
    kafka_cluster: KafkaCluster, postgres_url: str, tmp_path: Path
) -> None:
    """On three Kafka brokers (RF 3, min ISR 2): leaders and the group coordinator SIGKILLed, the whole cluster
    restarted, workers killed and paused: every transfer applied once, money conserved, no process exits."""
    report = run_bank(
        # About two shuffled rounds of the five fault kinds on a quick machine.
        duration_s=float(os.environ.get("CLUSTER_CHAOS_DURATION", 120)),
        seed=int(os.environ.get("CHAOS_SEED", 1)),
        database_url=postgres_url,
        log_dir=tmp_path,
        cluster=kafka_cluster,
        # leader-kill twice per shuffled round: killed several times in one run.
        faults=("kill", "zombie", "leader-kill", *BROKER_FAULTS),
        # On a slow machine 120 s may not hold them all: the run goes on until it has.
        min_faults={**{kind: 1 for kind in BROKER_FAULTS}, "leader-kill": 2},
    )
    assert all(report.faults.get(kind, 0) >= 1 for kind in BROKER_FAULTS), report.faults
    assert report.faults["leader-kill"] >= 2, f"the busiest leader killed several times: {report.faults}"
    assert all(report.resume.get(kind) for kind in BROKER_FAULTS), report.resume
    assert report.transfers > 1000
    assert report.ledger_lines > 2000 and report.ledger_lines == report.events
    assert report.ok, report.summary()
