"""Retention pruning of the dedup table: old rows go in batches, the horizon is guarded."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from exactlyonce import ConfigurationError, Message, claim
from exactlyonce.schema import processed
from exactlyonce.store import prune

from .helpers import engine_for, subprocess_env


def _claim_aged(engine: sa.Engine, count: int, age: timedelta, prefix: str) -> None:
    from sqlalchemy.orm import Session

    message = Message(topic="t", partition=0, offset=0, key=None, value=b"v")
    with Session(engine) as session, session.begin():
        for n in range(count):
            claim(session, "scope", f"{prefix}-{n}", message)
        session.execute(sa.update(processed).where(processed.c.message_id.like(f"{prefix}-%"))
                        .values(processed_at=datetime.now(UTC).replace(tzinfo=None) - age))


def _ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(processed.c.message_id)).scalars())


def test_prune_deletes_only_rows_past_the_window_in_batches(database_url: str) -> None:
    """Rows older than the window are deleted (in several batches); younger ones stay."""
    engine = engine_for(database_url)
    _claim_aged(engine, 25, timedelta(days=30), "old")
    _claim_aged(engine, 5, timedelta(days=1), "new")
    batches: list[int] = []
    assert prune(engine, timedelta(days=14), batch_size=10, progress=batches.append) == 25
    assert batches == [10, 10, 5]
    assert _ids(engine) == {f"new-{n}" for n in range(5)}
    engine.dispose()


def test_prune_refuses_the_redelivery_horizon_unless_forced(database_url: str) -> None:
    """A window shorter than the horizon (Kafka log retention) is refused; force overrides."""
    engine = engine_for(database_url)
    _claim_aged(engine, 3, timedelta(days=2), "mid")
    with pytest.raises(ConfigurationError, match="redelivery horizon"):
        prune(engine, timedelta(days=1))
    assert len(_ids(engine)) == 3
    assert prune(engine, timedelta(days=1), force=True) == 3
    assert prune(engine, timedelta(hours=1), horizon=timedelta(minutes=30)) == 0
    engine.dispose()


def test_prune_command(database_url: str) -> None:
    """`exactlyonce prune --older-than 14d` prunes; a window inside the horizon exits 2 with a reason."""
    engine = engine_for(database_url)
    _claim_aged(engine, 4, timedelta(days=20), "old")
    env = subprocess_env(EXACTLYONCE_DATABASE_URL=database_url)
    ok = subprocess.run([sys.executable, "-m", "exactlyonce", "prune", "--older-than", "14d"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "pruned 4 dedup rows" in ok.stdout
    refused = subprocess.run([sys.executable, "-m", "exactlyonce", "prune", "--older-than", "1d"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "redelivery horizon" in refused.stderr
    engine.dispose()
