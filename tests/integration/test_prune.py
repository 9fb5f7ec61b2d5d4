"""Retention pruning of the dedup table: old rows go in batches, the horizon is guarded."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from exactlyonce import ConfigurationError, Message, claim
from exactlyonce.schema import processed
from exactlyonce.store import prune, topic_horizon

from .helpers import engine_for, subprocess_env


def _claim_aged(engine: sa.Engine, count: int, age: timedelta, prefix: str, topic: str = "t") -> None:
    from sqlalchemy.orm import Session

    message = Message(topic=topic, partition=0, offset=0, key=None, value=b"v")
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
    assert prune(engine, timedelta(days=15), batch_size=10, progress=batches.append) == 25
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
    """`exactlyonce prune --older-than 15d` prunes; a window inside the horizon exits 2 with a reason."""
    engine = engine_for(database_url)
    _claim_aged(engine, 4, timedelta(days=20), "old")
    env = subprocess_env(EXACTLYONCE_DATABASE_URL=database_url)
    ok = subprocess.run([sys.executable, "-m", "exactlyonce", "prune", "--older-than", "15d"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "pruned 4 dedup rows" in ok.stdout
    # The horizon is checked for the topics of the rows a prune would delete.
    _claim_aged(engine, 2, timedelta(days=2), "mid")
    refused = subprocess.run([sys.executable, "-m", "exactlyonce", "prune", "--older-than", "1d"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "redelivery horizon" in refused.stderr
    engine.dispose()


# -- the redelivery horizon per topic, from the broker ------------------------


def test_prune_checks_only_the_topics_of_the_rows_it_deletes(database_url: str) -> None:
    """Each topic among the rows to delete is held to its own horizon; other topics' horizons do not matter."""
    engine = engine_for(database_url)
    _claim_aged(engine, 2, timedelta(days=20), "a", topic="short")
    _claim_aged(engine, 2, timedelta(days=2), "b", topic="compacted")
    horizons = {
        "short": topic_horizon("short", {"cleanup.policy": "delete", "retention.ms": "60000",
                                         "segment.ms": "60000", "message.timestamp.type": "LogAppendTime"}),
        "compacted": topic_horizon("compacted", {"cleanup.policy": "compact"}),
    }
    with pytest.raises(ConfigurationError, match=r"topic 'compacted' .*redelivery horizon \(unbounded"):
        prune(engine, timedelta(days=1), horizons=horizons)
    assert len(_ids(engine)) == 4
    assert prune(engine, timedelta(days=3), horizons=horizons) == 2
    assert _ids(engine) == {"b-0", "b-1"}
    engine.dispose()
