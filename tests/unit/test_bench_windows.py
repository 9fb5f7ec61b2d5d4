"""The scaling benchmark's stall measure (``bench/windows.py``): a long pause always shows, a steady run never does."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from bench.windows import MAX_WINDOW_S, MIN_WINDOW_S, commit_gaps, min_window_rate, window_s

POLL_S = 0.25


def sampled(commits: list[tuple[float, int]], end: float) -> list[tuple[float, int]]:
    """The parent's view: the count of records committed, polled every ``POLL_S`` until ``end``."""
    samples, done, i, t = [], 0, 0, 0.0
    while t <= end + POLL_S:
        while i < len(commits) and commits[i][0] <= t:
            done += commits[i][1]
            i += 1
        samples.append((t, done))
        t += POLL_S
    return samples


# A run: commits every `gap` seconds (jittered), `size` records each; optionally one stall inserted.
runs = st.tuples(
    st.floats(0.05, 0.7),  # the run's usual interval between commits
    st.integers(1, 500),  # records a commit
    st.integers(8, 60),  # commits
    st.lists(st.floats(0.5, 1.5), min_size=60, max_size=60),  # jitter factor of each interval
)


def commits_of(gap: float, size: int, count: int, jitter: list[float], stall_after: int | None = None,
               stall_s: float = 0.0) -> list[tuple[float, int]]:
    t, out = 0.3, []
    for k in range(count):
        t += gap * jitter[k] + (stall_s if k == stall_after else 0.0)
        out.append((t, size))
    return out


@given(runs, st.data())
def test_a_pause_longer_than_the_longest_window_always_shows_as_zero(run, data):
    gap, size, count, jitter = run
    stall_after = data.draw(st.integers(1, count - 2))
    stall_s = data.draw(st.floats(MAX_WINDOW_S + 2 * POLL_S, 30.0))
    commits = commits_of(gap, size, count, jitter, stall_after, stall_s)
    total = size * count
    samples = sampled(commits, commits[-1][0])
    window = window_s(samples, total)
    assert MIN_WINDOW_S <= window <= MAX_WINDOW_S
    assert min_window_rate(samples, total, window=window) == 0.0
    assert max(commit_gaps(samples, total)) >= stall_s - POLL_S


@given(runs)
def test_a_run_committing_at_least_every_700_ms_never_shows_zero(run):
    gap, size, count, jitter = run
    commits = commits_of(gap, size, count, [min(j, 1.0) for j in jitter])
    total = size * count
    samples = sampled(commits, commits[-1][0])
    window = window_s(samples, total)
    rate = min_window_rate(samples, total, window=window)
    assert math.isnan(rate) or rate > 0  # NaN: the whole run was shorter than one window
    assert max(commit_gaps(samples, total), default=0.0) <= 0.7 + POLL_S


def test_one_worker_with_a_transaction_over_a_second_is_not_a_stall():
    # The case that made the window grow: 100 records every 0.66 s, one transaction of 1.4 s.
    intervals = [0.66] * 20 + [1.4] + [0.66] * 20
    commits, t = [], 0.3
    for interval in intervals:
        t += interval
        commits.append((t, 100))
    total = 100 * len(commits)
    samples = sampled(commits, t)
    assert min_window_rate(samples, total, window=MIN_WINDOW_S) == 0.0  # the 1-second measure said "stopped"
    window = window_s(samples, total)
    assert window > MIN_WINDOW_S
    assert min_window_rate(samples, total, window=window) > 0


def test_only_what_follows_the_last_rebalance_counts():
    commits = [(0.5, 10), (1.0, 10), (6.0, 10), (6.3, 10), (6.6, 10), (6.9, 10), (7.2, 10), (7.5, 10)]
    samples = sampled(commits, 7.5)
    assert min_window_rate(samples, 80) == 0.0
    assert min_window_rate(samples, 80, since=5.9) > 0
    assert max(commit_gaps(samples, 80, since=5.9)) < 1.0
