"""The scaling runs' stall measures, from the parent's samples of the dedup-table count.

``samples`` are ``(wall time, records in the database)`` pairs, taken by the
parent every 0.25 s or so; ``total`` is the run's record count; ``since`` the
group's last rebalance (a rebalance pauses every member by design, so
nothing before it counts). The measures see commits only through those
samples: a pause is known to about one sampling interval.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

#: The window of :func:`min_window_rate`: at least this many seconds ...
MIN_WINDOW_S = 1.0
#: ... or this many of the run's median intervals between commits, if longer ...
WINDOW_COMMITS = 3
#: ... but never longer than this: a pause this long always shows as a window without a commit.
MAX_WINDOW_S = 2.0

Samples = Sequence[tuple[float, int]]


def commit_gaps(samples: Samples, total: int, since: float = 0.0) -> list[float]:
    """The times between successive samples that saw the count grow, from ``since`` until ``total``."""
    grew = [t for i, (t, n) in enumerate(samples)
            if i and n != samples[i - 1][1] and samples[i - 1][1] < total and t >= since]
    return [b - a for a, b in itertools.pairwise(grew)]


def window_s(samples: Samples, total: int, since: float = 0.0) -> float:
    """The window of :func:`min_window_rate`: 3 median commit intervals, within 1 s and 2 s.

    One worker at 150 msgs/s, 100 records a transaction, commits every
    0.6-0.7 s; one transaction now and then a little over a second leaves a
    1-second window without a commit while the worker is working normally:
    a window that short measures how long a transaction takes, not whether
    the group stopped. The 2-s cap keeps any longer pause visible.
    """
    gaps = sorted(commit_gaps(samples, total, since))
    median = gaps[len(gaps) // 2] if gaps else 0.0
    return min(MAX_WINDOW_S, max(MIN_WINDOW_S, WINDOW_COMMITS * median))


def min_window_rate(samples: Samples, total: int, since: float = 0.0, window: float = MIN_WINDOW_S) -> float:
    """The lowest rate over any span of at least ``window`` seconds from the first record done to the last.

    Only spans from ``since`` on. NaN when the run is shorter than one window.
    """
    live = [(t, n) for t, n in samples if n > 0 and t >= since]
    end = next((i for i, (_, n) in enumerate(live) if n >= total), len(live) - 1)
    rates = []
    for i, (t0, n0) in enumerate(live[:end]):
        j = next((j for j in range(i + 1, end + 1) if live[j][0] - t0 >= window), None)
        if j is None:
            break
        rates.append((live[j][1] - n0) / (live[j][0] - t0))
    return min(rates) if rates else float("nan")
