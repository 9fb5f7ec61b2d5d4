"""`exactlyonce run MODULE:ATTR` as a real process, stopped by SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .helpers import (
    committed_and_end_offsets,
    create_effects,
    create_topic,
    effect_counts,
    engine_for,
    process,
    produce,
    rec,
    total_effects,
    unique,
    wait_until,
)

N = 30
PARTITIONS = 3


@pytest.mark.timeout(120)
def test_cli_run_applies_then_exits_cleanly_on_sigterm(
    bootstrap_servers: str, database_url: str, tmp_path: Path
) -> None:
    """The CLI applies every record, and on SIGTERM exits 0 with every offset committed."""
    topic, group = unique("cli"), unique("cli-group")
    create_topic(bootstrap_servers, topic, PARTITIONS)
    engine = engine_for(database_url)
    create_effects(engine)
    message_ids = [f"c-{i:02d}" for i in range(N)]
    produce(bootstrap_servers, topic, [rec(m, partition=i % PARTITIONS) for i, m in enumerate(message_ids)])

    with process([sys.executable, "-m", "exactlyonce", "run", "tests.integration.cli_app:app"],
                 tmp_path / "cli.log",
                 EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap_servers,
                 EXACTLYONCE_DATABASE_URL=database_url,
                 EXACTLYONCE_TEST_TOPIC=topic,
                 EXACTLYONCE_TEST_GROUP=group) as cli:
        try:
            wait_until(lambda: total_effects(engine) >= N, 60, f"{N} effects")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cli.log_tail()}") from None
        assert cli.terminate(timeout=20) == 0, cli.log_tail()
        assert "stopped:" in cli.log_tail()

    assert effect_counts(engine) == dict.fromkeys(message_ids, 1)
    committed, end = committed_and_end_offsets(bootstrap_servers, group, topic)
    assert end == dict.fromkeys(range(PARTITIONS), N // PARTITIONS)
    assert committed == end
    engine.dispose()
