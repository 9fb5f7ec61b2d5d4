"""Durations as people write them, and read back: exactlyonce._duration."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from exactlyonce import store
from exactlyonce._duration import format_duration, parse_duration


@pytest.mark.parametrize(("value", "text"), [
    (timedelta(0), "0s"),
    (timedelta(days=7), "7d"),
    (timedelta(days=14), "14d"),
    (timedelta(minutes=15), "15m"),
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(milliseconds=500), "500ms"),
    (timedelta(seconds=90), "1m30s"),
    (timedelta(days=14, hours=1), "14d1h"),
    (timedelta(days=1, seconds=1, microseconds=1500), "1d1s1ms500us"),
    (timedelta(microseconds=7), "7us"),
    (-timedelta(minutes=5), "-5m"),
    (timedelta.max, "999999999d23h59m59s999ms999us"),
])
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize(("text", "value"), [
    ("30s", timedelta(seconds=30)),
    ("90m", timedelta(minutes=90)),
    ("36h", timedelta(hours=36)),
    ("2w", timedelta(weeks=2)),
    ("1w2d", timedelta(days=9)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("5ms", timedelta(milliseconds=5)),
    ("5m5ms", timedelta(minutes=5, milliseconds=5)),
    ("1m30s250ms", timedelta(minutes=1, seconds=30, milliseconds=250)),
    ("0s", timedelta(0)),
    (" 15d ", timedelta(days=15)),
])
def test_parse_duration(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", [
    "", "15", "d", "1.5h", "-5m", "30m1h", "1h1h", "1 h", "1h 30m", "5x", "1H", "7 days, 0:00:00", "99999999999d",
])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(st.timedeltas(min_value=timedelta(0)))
@example(timedelta.max)
@example(timedelta(microseconds=1))
def test_parse_reads_back_what_format_writes(value: timedelta) -> None:
    text = format_duration(value)
    assert parse_duration(text) == value
    # Written the shortest way: each unit once, none of zero, days the largest.
    assert "w" not in text
    assert text == "0s" or not any(text.startswith("0") or f"{u}0" in text for u in "dhms")


UNITS = [("w", timedelta(weeks=1)), ("d", timedelta(days=1)), ("h", timedelta(hours=1)),
         ("m", timedelta(minutes=1)), ("s", timedelta(seconds=1)), ("ms", timedelta(milliseconds=1)),
         ("us", timedelta(microseconds=1))]


@given(st.lists(st.tuples(st.sampled_from(range(len(UNITS))), st.integers(0, 10**6)), min_size=1,
                unique_by=lambda part: part[0]))
def test_parse_adds_the_parts_of_any_text_largest_unit_first(parts: list[tuple[int, int]]) -> None:
    """``1h90m``, ``2w3d``, ``0m7us``: any counts, in any units, largest first."""
    parts.sort()
    text = "".join(f"{count}{UNITS[unit][0]}" for unit, count in parts)
    assert parse_duration(text) == sum((count * UNITS[unit][1] for unit, count in parts), timedelta(0))
    if len(parts) > 1:  # the same parts, smallest unit first, are refused
        with pytest.raises(ValueError):
            parse_duration("".join(f"{count}{UNITS[unit][0]}" for unit, count in reversed(parts)))


def test_store_keeps_format_duration() -> None:
    """``exactlyonce.store.format_duration`` (imported by others before) is the same function."""
    assert store.format_duration is format_duration
