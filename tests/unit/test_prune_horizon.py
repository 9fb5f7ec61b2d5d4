"""The redelivery horizon arithmetic behind `exactlyonce prune` (no services needed)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from exactlyonce.store import (
    DEFAULT_REDELIVERY_HORIZON,
    at_least,
    fallback_horizon,
    format_duration,
    topic_horizon,
)

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
LONG_MAX = str(2**63 - 1)

#: What Apache Kafka 4.1 reports for a topic created without settings.
KAFKA_DEFAULTS = {
    "cleanup.policy": "delete",
    "retention.ms": "604800000",
    "segment.ms": "604800000",
    "message.timestamp.type": "CreateTime",
    "message.timestamp.after.max.ms": "3600000",
}


def settings(**changes: str | None) -> dict[str, str | None]:
    return {**KAFKA_DEFAULTS, **{name.replace("_", "."): value for name, value in changes.items()}}


def test_default_topic_is_retention_plus_segment_plus_future_allowance() -> None:
    """7d retention + 7d segment.ms (a segment rolls only then) + 1h of future timestamps."""
    h = topic_horizon("t", settings())
    assert h.horizon == 14 * DAY + HOUR
    assert h.source == "broker"
    assert h.text == "14d1h"
    assert "retention.ms 7d + segment.ms 7d" in h.reason and "message.timestamp.after.max.ms 1h" in h.reason
    assert not h.allows(7 * DAY)
    assert not h.allows(14 * DAY)
    assert h.allows(14 * DAY + HOUR)
    assert h.allows(15 * DAY)
    # The fallback covers Kafka's defaults.
    assert h.horizon is not None
    assert h.horizon <= DEFAULT_REDELIVERY_HORIZON


def test_small_retention_and_segment() -> None:
    h = topic_horizon("t", settings(retention_ms="60000", segment_ms="60000"))
    assert h.horizon == timedelta(minutes=62)
    assert h.allows(2 * HOUR)


def test_log_append_time_has_no_future_allowance() -> None:
    h = topic_horizon("t", settings(message_timestamp_type="LogAppendTime", message_timestamp_after_max_ms=LONG_MAX))
    assert h.horizon == 14 * DAY


def test_the_oldest_record_still_in_the_log_lengthens_the_horizon() -> None:
    """A record older than retention + segment is still readable: the horizon reaches back to it."""
    h = topic_horizon("t", settings(), oldest_record_age=40 * DAY)
    assert h.horizon == 40 * DAY + HOUR
    assert "oldest record 40d old" in h.reason
    assert h.oldest_record_age == 40 * DAY


def test_a_young_oldest_record_does_not_shorten_the_horizon() -> None:
    assert topic_horizon("t", settings(), oldest_record_age=HOUR).horizon == 14 * DAY + HOUR
    # A record stamped in the future is not younger than new.
    future = topic_horizon("t", settings(), oldest_record_age=-HOUR)
    assert future.horizon == 14 * DAY + HOUR
    assert future.oldest_record_age == timedelta(0)


@pytest.mark.parametrize("policy", ["compact", "compact,delete", "delete, compact"])
def test_compacted_topics_have_no_bound(policy: str) -> None:
    h = topic_horizon("t", settings(cleanup_policy=policy))
    assert h.horizon is None
    assert h.text == "unbounded"
    assert "compact" in h.reason
    assert not h.allows(timedelta(days=100_000))


def test_infinite_retention_has_no_bound() -> None:
    h = topic_horizon("t", settings(retention_ms="-1"))
    assert h.horizon is None
    assert "retention.ms=-1" in h.reason
    assert topic_horizon("t", settings(retention_ms=LONG_MAX)).horizon is None


def test_unlimited_future_timestamps_have_no_bound() -> None:
    """Kafka before 4.0 let a CreateTime record be stamped arbitrarily far ahead by default."""
    h = topic_horizon("t", settings(message_timestamp_after_max_ms=LONG_MAX))
    assert h.horizon is None
    assert "message.timestamp.after.max.ms is unlimited" in h.reason


def test_brokers_before_3_6_use_the_symmetric_difference_setting() -> None:
    old = {k: v for k, v in settings().items() if k != "message.timestamp.after.max.ms"}
    h = topic_horizon("t", {**old, "message.timestamp.difference.max.ms": "7200000"})
    assert h.horizon == 14 * DAY + 2 * HOUR
    assert topic_horizon("t", {**old, "message.timestamp.difference.max.ms": LONG_MAX}).horizon is None


@pytest.mark.parametrize("missing", ["cleanup.policy", "retention.ms", "segment.ms"])
def test_a_missing_setting_is_an_error(missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        topic_horizon("t", {k: v for k, v in settings().items() if k != missing})


def test_fallback_and_raising_to_a_floor() -> None:
    f = fallback_horizon("t", 15 * DAY, "the broker's settings could not be read: down")
    assert (f.horizon, f.source) == (15 * DAY, "fallback")
    assert f.reason == "--horizon 15d: the broker's settings could not be read: down"
    small = topic_horizon("t", settings(retention_ms="60000", segment_ms="60000"))
    raised = at_least(small, 15 * DAY, "the oldest record could not be read")
    assert raised.horizon == 15 * DAY and "raised to --horizon 15d" in raised.reason
    assert at_least(topic_horizon("t", settings(), 40 * DAY), 15 * DAY, "x").horizon == 40 * DAY + HOUR
    assert at_least(topic_horizon("t", settings(retention_ms="-1")), 15 * DAY, "x").horizon is None


def test_to_json_states_the_horizon_and_its_inputs() -> None:
    data = topic_horizon("t", settings(), oldest_record_age=2 * HOUR).to_json()
    assert data["topic"] == "t"
    assert data["horizon_seconds"] == (14 * DAY + HOUR).total_seconds()
    assert data["source"] == "broker"
    assert data["settings"]["retention.ms"] == "604800000"
    assert data["oldest_record_age_seconds"] == 7200.0
    assert topic_horizon("t", settings(cleanup_policy="compact")).to_json()["horizon_seconds"] is None


def test_format_duration() -> None:
    assert format_duration(timedelta(0)) == "0s"
    assert format_duration(timedelta(days=14, hours=1)) == "14d1h"
    assert format_duration(timedelta(minutes=62)) == "1h2m"
    assert format_duration(timedelta(seconds=90)) == "1m30s"
