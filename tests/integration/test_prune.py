"""Retention pruning of the dedup table: old rows go in batches, the horizon is guarded."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from exactlyonce import ConfigurationError, Message, claim
from exactlyonce.schema import processed
from exactlyonce.store import prune, topic_horizon

from .helpers import engine_for, produce, rec, subprocess_env, unique, wait_until


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


def _create_topic(bootstrap: str, name: str, **configs: str) -> None:
    """``name`` with one partition and the given topic settings (``retention_ms="60000"``)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1,
                                      topic_configs={k.replace("_", "."): v for k, v in configs.items()})])
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        wait_until(lambda: consumer.partitions_for_topic(name), 15, f"topic {name}")
    finally:
        consumer.close()


def _prune_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(EXACTLYONCE_DATABASE_URL=database_url)
    env.pop("EXACTLYONCE_BOOTSTRAP_SERVERS", None)
    return subprocess.run([sys.executable, "-m", "exactlyonce", "prune", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_prune_lets_old_rows_of_a_short_retention_topic_go(database_url: str, bootstrap_servers: str) -> None:
    """retention.ms and segment.ms of 1 minute: the horizon is 1m + 1m + 1h of future timestamps, not 15 days."""
    engine = engine_for(database_url)
    topic = unique("prune-short")
    _create_topic(bootstrap_servers, topic, retention_ms="60000", segment_ms="60000")
    produce(bootstrap_servers, topic, [rec("m-1")])
    _claim_aged(engine, 3, timedelta(days=1), "old", topic=topic)
    refused = _prune_cli(database_url, "--older-than", "1h", "--bootstrap-servers", bootstrap_servers)
    assert refused.returncode == 2
    assert f"topic {topic!r}" in refused.stderr and "redelivery horizon (1h2m" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert len(_ids(engine)) == 3
    data = _json(_prune_cli(database_url, "--older-than", "2h", "--bootstrap-servers", bootstrap_servers, "--json"))
    assert data["deleted"] == 3
    assert data["broker_settings_read"] is True and data["broker_problem"] is None
    assert "max(retention.ms + segment.ms, age of the oldest record" in data["horizon_rule"]
    [horizon] = data["topics"]
    assert horizon["topic"] == topic and horizon["source"] == "broker"
    assert horizon["horizon_seconds"] == 60 + 60 + 3600
    assert horizon["settings"]["retention.ms"] == "60000"
    assert horizon["oldest_record_age_seconds"] is not None and horizon["oldest_record_age_seconds"] < 600
    assert _ids(engine) == set()
    engine.dispose()


def test_prune_default_topic_refuses_7d_allows_15d(database_url: str, bootstrap_servers: str) -> None:
    """Kafka's defaults keep a record readable for 7d retention + 7d until its segment rolls (+ 1h)."""
    engine = engine_for(database_url)
    topic = unique("prune-default")
    _create_topic(bootstrap_servers, topic)
    _claim_aged(engine, 4, timedelta(days=20), "old", topic=topic)
    for window in ("7d", "14d"):
        refused = _prune_cli(database_url, "--older-than", window, "--bootstrap-servers", bootstrap_servers)
        assert refused.returncode == 2, refused.stdout
        assert "redelivery horizon (14d1h; retention.ms 7d + segment.ms 7d" in refused.stderr
    assert len(_ids(engine)) == 4
    ok = _prune_cli(database_url, "--older-than", "15d", "--bootstrap-servers", bootstrap_servers)
    assert ok.returncode == 0, ok.stderr
    assert f"topic {topic}: redelivery horizon 14d1h (broker: " in ok.stdout
    assert "pruned 4 dedup rows older than 15d" in ok.stdout
    assert "could not be read" not in ok.stdout
    engine.dispose()


def test_prune_refuses_a_compacted_topic_unless_forced(database_url: str, bootstrap_servers: str) -> None:
    """A compacted topic keeps each key's latest record forever: no window is safe."""
    engine = engine_for(database_url)
    topic = unique("prune-compacted")
    _create_topic(bootstrap_servers, topic, cleanup_policy="compact")
    _claim_aged(engine, 2, timedelta(days=400), "old", topic=topic)
    refused = _prune_cli(database_url, "--older-than", "365d", "--bootstrap-servers", bootstrap_servers)
    assert refused.returncode == 2
    assert "redelivery horizon (unbounded; cleanup.policy=compact" in refused.stderr
    assert len(_ids(engine)) == 2
    data = _json(_prune_cli(database_url, "--older-than", "365d", "--force", "--json",
                            "--bootstrap-servers", bootstrap_servers))
    assert data["deleted"] == 2 and data["forced"] is True
    assert data["topics"][0]["horizon_seconds"] is None and data["topics"][0]["horizon"] == "unbounded"
    assert _ids(engine) == set()
    engine.dispose()


def test_prune_refuses_rows_of_records_older_than_retention_still_in_the_log(
    database_url: str, bootstrap_servers: str
) -> None:
    """A segment is kept until its newest record expires: an older record beside it stays readable."""
    engine = engine_for(database_url)
    topic = unique("prune-oldest")
    _create_topic(bootstrap_servers, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=1000)
    try:
        # One batch, so one segment: the 40-day-old record lives as long as the new one.
        now_ms = int(time.time() * 1000)
        producer.send(topic, b"old", headers=[("message-id", b"m-old")], timestamp_ms=now_ms - 40 * 86_400_000)
        producer.send(topic, b"new", headers=[("message-id", b"m-new")], timestamp_ms=now_ms)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    _claim_aged(engine, 2, timedelta(days=50), "old", topic=topic)
    refused = _prune_cli(database_url, "--older-than", "15d", "--bootstrap-servers", bootstrap_servers)
    assert refused.returncode == 2
    # 40 days and the seconds since the record was sent.
    assert re.search(r"redelivery horizon \(40d1h(\d+m)?(\d+s)?; max\(retention\.ms 7d \+ segment\.ms 7d, "
                     r"oldest record 40d(\d+m)?(\d+s)? old\)", refused.stderr), refused.stderr
    data = _json(_prune_cli(database_url, "--older-than", "41d", "--json", "--bootstrap-servers", bootstrap_servers))
    assert data["deleted"] == 2
    assert 40 * 86400 <= data["topics"][0]["oldest_record_age_seconds"] < 41 * 86400
    engine.dispose()


def test_prune_holds_a_topic_unknown_to_the_broker_to_the_fallback(database_url: str, bootstrap_servers: str) -> None:
    """Rows of a topic the broker gives no settings for (deleted, or not authorized) get --horizon."""
    engine = engine_for(database_url)
    topic = unique("prune-gone")
    _claim_aged(engine, 2, timedelta(days=20), "old", topic=topic)
    refused = _prune_cli(database_url, "--older-than", "14d", "--bootstrap-servers", bootstrap_servers)
    assert refused.returncode == 2
    assert "redelivery horizon (15d; --horizon 15d: the broker gave no settings for the topic" in refused.stderr
    data = _json(_prune_cli(database_url, "--older-than", "15d", "--json", "--bootstrap-servers", bootstrap_servers))
    assert data["deleted"] == 2 and data["broker_settings_read"] is True
    assert [(t["topic"], t["source"], t["horizon"]) for t in data["topics"]] == [(topic, "fallback", "15d")]
    engine.dispose()


def test_prune_falls_back_to_the_explicit_horizon_when_the_broker_is_unreachable(database_url: str) -> None:
    """Nothing answers: every topic gets --horizon (15d by default), and the output says why."""
    engine = engine_for(database_url)
    _claim_aged(engine, 3, timedelta(days=20), "old")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    refused = _prune_cli(database_url, "--older-than", "14d", "--bootstrap-servers", dead)
    assert refused.returncode == 2
    assert "redelivery horizon (15d; --horizon 15d: the broker's settings could not be read" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    ok = _prune_cli(database_url, "--older-than", "19d", "--horizon", "18d", "--bootstrap-servers", dead)
    assert ok.returncode == 0, ok.stderr
    assert "the broker's settings could not be read" in ok.stdout
    assert "every topic got the --horizon fallback of 18d" in ok.stdout
    assert "topic t: redelivery horizon 18d (--horizon fallback)" in ok.stdout
    assert ok.stderr == ""
    assert "pruned 3 dedup rows" in ok.stdout
    _claim_aged(engine, 2, timedelta(days=20), "again")
    data = _json(_prune_cli(database_url, "--older-than", "15d", "--json", "--bootstrap-servers", dead))
    assert data["deleted"] == 2
    assert data["broker_settings_read"] is False and "no Kafka broker answers" in data["broker_problem"]
    assert data["fallback_horizon_seconds"] == 15 * 86400
    assert data["topics"] == [{
        "topic": "t", "horizon_seconds": 15 * 86400, "horizon": "15d", "source": "fallback",
        "reason": f"--horizon 15d: {data['broker_problem']}", "settings": {}, "oldest_record_age_seconds": None,
    }]
    engine.dispose()
