"""What a worker process needs before anything heavy is imported (the raw variant's RSS is its own)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

#: Marks the lines a worker process reports on (the rest of stdout is ignored).
EVENT_PREFIX = "BENCH "

#: Every consumer in the benchmark (raw, hand-written and exactlyonce) uses these settings.
#: ``fetch_max_wait_ms``: the embedded broker (tansu) answers a fetch only when this wait
#: runs out, even if records arrived meanwhile (with kafka-python's default of 500 ms a
#: record waits 130 ms at the median); Apache Kafka answers as soon as a record is there.
#: 10 ms keeps that artefact out of the latencies.
CONSUMER_CONFIG: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
                                   "fetch_max_wait_ms": 10}


def emit(event: str, **data: Any) -> None:
    """Report an event to the parent process (one JSON line on stdout)."""
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kb() -> int:
    """The current resident set size of this process, in KiB (VmRSS)."""
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    """The peak resident set size of this process so far, in KiB (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that over ``execve`` from the
    process image that forked, so a worker would report the parent's size.
    """
    return _status_kb("VmHWM")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


#: Set (to anything) in a worker's environment: ``import crc32c`` fails in that process.
NO_CRC32C_ENV = "BENCH_NO_CRC32C"


class _BlockCrc32c:
    """A meta-path finder refusing ``crc32c``: kafka-python then checks CRCs in pure Python."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "crc32c" or name.startswith("crc32c."):
            raise ImportError(f"{name} blocked by the benchmark (${NO_CRC32C_ENV})")


def block_crc32c_if_asked() -> None:
    """Install the crc32c blocker when ``$BENCH_NO_CRC32C`` is set; call before importing kafka."""
    import os

    if os.environ.get(NO_CRC32C_ENV) and "kafka" not in sys.modules:
        sys.meta_path.insert(0, _BlockCrc32c())


def crc_implementation() -> str:
    """Which CRC-32C kafka-python uses in this process: ``"C (crc32c)"`` or ``"pure Python"``."""
    from kafka.record import util

    return "pure Python" if getattr(util, "crc32c_c", None) is None else "C (crc32c)"
