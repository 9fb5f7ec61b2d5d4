"""A worker killed between its database commit and its offset commit."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from .helpers import (
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    effect_rows,
    engine_for,
    process,
    produce,
    rec,
    unique,
    wait_until,
)

N = 40
PARTITIONS = 2
CRASH_INDEX = 25


def _worker_argv(bootstrap: str, database_url: str, topic: str, group: str, name: str,
                 seen_file: Path, kind: str, crash_id: str | None = None,
                 kafka_client: str = "kafka-python") -> list[str]:
    argv = [sys.executable, "-m", "tests.integration.worker", "--bootstrap", bootstrap,
            "--database-url", database_url, "--topic", topic, "--group", group, "--name", name,
            "--seen-file", str(seen_file), "--kafka-client", kafka_client]
    if kind == "async":
        argv.append("--async")
    if crash_id is not None:
        argv += ["--crash-after-commit-of", crash_id]
    return argv


def _seen(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(180)
def test_crash_between_db_commit_and_offset_commit_redelivers_and_skips(
    bootstrap_servers: str, database_url: str, tmp_path: Path, handler_kind: str
) -> None:
    """A record committed to the DB whose offset was not committed is redelivered and skipped, not re-applied."""
    check_crash_redelivery(bootstrap_servers, database_url, tmp_path, handler_kind)


def check_crash_redelivery(bootstrap_servers: str, database_url: str, tmp_path: Path, handler_kind: str,
                           kafka_client: str = "kafka-python") -> None:
    """The test above with the workers' consumer on ``kafka_client`` (test_confluent_client runs it too)."""
    topic, group = unique("crash"), unique("crash-group")
    create_topic(bootstrap_servers, topic, PARTITIONS)
    engine = engine_for(database_url)
    create_effects(engine)
    message_ids = [f"m-{i:03d}" for i in range(N)]
    positions = produce(bootstrap_servers, topic,
                        [rec(mid, partition=i % PARTITIONS) for i, mid in enumerate(message_ids)])
    crash_id = message_ids[CRASH_INDEX]
    crash_partition, crash_offset = positions[CRASH_INDEX]

    # 1. The first worker applies records until it commits crash_id, then dies by SIGKILL.
    first_seen = tmp_path / "first.seen"
    with process(_worker_argv(bootstrap_servers, database_url, topic, group, "first", first_seen,
                              handler_kind, crash_id, kafka_client), tmp_path / "first.log") as first:
        code = first.wait(60)
        assert code == -signal.SIGKILL, f"worker exited with {code}:\n{first.log_tail()}"

    # The crash happened after the DB commit: effect and dedup row are durable...
    assert effect_counts(engine).get(crash_id) == 1
    assert crash_id in {row.message_id for row in dedup_rows(engine)}
    # ...and before the offset commit: the group has not committed past crash_id.
    committed, _ = committed_and_end_offsets(bootstrap_servers, group, topic)
    assert committed[crash_partition] is None or committed[crash_partition] <= crash_offset
    applied_by_first = {row.message_id for row in effect_rows(engine)}

    # 2. A restarted worker in the same group finishes the topic.
    second_seen = tmp_path / "second.seen"
    with process(_worker_argv(bootstrap_servers, database_url, topic, group, "second", second_seen,
                              handler_kind, kafka_client=kafka_client),
                 tmp_path / "second.log") as second:
        try:
            wait_until(lambda: len(dedup_rows(engine)) == N, 90, "every record claimed")

            def drained() -> bool:
                committed, end = committed_and_end_offsets(bootstrap_servers, group, topic)
                return committed == end

            wait_until(drained, 30, "offsets committed up to the end", interval=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{second.log_tail()}") from None
        assert second.terminate() == 0, second.log_tail()

    # Every record applied exactly once; crash_id only by the worker that died.
    assert effect_counts(engine) == dict.fromkeys(message_ids, 1)
    rows = effect_rows(engine)
    assert [r.worker for r in rows if r.message_id == crash_id] == ["first"]
    assert {r.message_id for r in rows if r.worker == "second"} == set(message_ids) - applied_by_first
    assert len(dedup_rows(engine)) == N
    # The restarted worker was handed records the dead one had applied, and skipped them.
    redelivered = set(_seen(second_seen)) & applied_by_first
    assert crash_id in redelivered
    assert set(_seen(second_seen)) >= set(message_ids) - applied_by_first
