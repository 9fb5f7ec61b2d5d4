"""Durations as people write them: ``7d``, ``15m``, ``1h30m``, ``500ms``.

:func:`format_duration` and :func:`parse_duration` are inverses:
``parse_duration(format_duration(d)) == d`` for every non-negative
``timedelta``. A text is whole numbers, each followed by a unit, largest unit
first, each unit at most once: ``w`` (weeks, read but never written), ``d``,
``h``, ``m``, ``s``, ``ms``, ``us``. This module imports nothing of the
package, so any module may use it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["format_duration", "parse_duration", "parse_time"]

#: Units written by :func:`format_duration`, largest first.
_WRITTEN = (
    ("d", timedelta(days=1)),
    ("h", timedelta(hours=1)),
    ("m", timedelta(minutes=1)),
    ("s", timedelta(seconds=1)),
    ("ms", timedelta(milliseconds=1)),
    ("us", timedelta(microseconds=1)),
)
#: Units read by :func:`parse_duration`, largest first.
_READ = (("w", timedelta(weeks=1)), *_WRITTEN)

_PATTERN = re.compile("".join(rf"(?:(?P<{unit}>\d+){unit})?" for unit, _ in _READ))

#: What a duration looks like, for error messages.
SYNTAX = "whole numbers with units w, d, h, m, s, ms, us, largest first (15d, 36h, 1h30m, 500ms)"


def format_duration(value: timedelta) -> str:
    """``7d``, ``1h30m``, ``500ms``, ``0s``: ``value`` exactly, in the fewest parts (days the largest unit).

    A negative duration gets a leading ``-`` (``-5m``).
    """
    if value < timedelta(0):
        return "-" + format_duration(-value)
    if not value:
        return "0s"
    parts = []
    for unit, size in _WRITTEN:
        count, value = divmod(value, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_duration(text: str) -> timedelta:
    """The duration ``text`` writes (``30s``, ``90m``, ``1h30m``, ``14d``, ``2w``, ``500ms``).

    Surrounding whitespace is ignored. Raises ``ValueError`` for anything
    else, including a duration too long for a ``timedelta``.
    """
    match = _PATTERN.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"invalid duration {text!r}: use {SYNTAX}")
    total = timedelta(0)
    try:
        for unit, size in _READ:
            if match[unit] is not None:
                total += int(match[unit]) * size
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: longer than {format_duration(timedelta.max)}") from None
    return total


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from ISO-8601 (naive means UTC) or a duration ago (``2h``: two hours ago).

    Raises ``ValueError`` whose text says what to type.
    """
    text = text.strip()
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - ago
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use ISO-8601 (2026-11-29T14:00:00Z) or a duration ago (90m, 2h, 1d, 1h30m)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
