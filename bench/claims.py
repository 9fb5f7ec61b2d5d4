"""(g) Claim latency against the size of the dedup table.

``claim_many`` of 500 fresh IDs and single ``claim()`` calls are timed on an
empty ``exactlyonce_processed``, then again after it was filled with
``rows`` rows of one scope. The filler IDs are 32 hex characters spread evenly
over the same key space as the fresh ones (uuid4 hex), and are inserted in key
order so that filling is fast; fresh IDs land all over the primary-key index,
as real random IDs do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bench.proc import percentile
from exactlyonce import _db
from exactlyonce.message import Message
from exactlyonce.store import claim, claim_many

SCOPE = "bench:claims"
BATCH = 500
#: Filler IDs are ``lpad(hex(i * step), 15) + 17 zeros``: 32 hex characters, like uuid4().hex.
_KEY_SPACE = 2**60
_CHUNK = 1_000_000

_MESSAGE = Message(topic="claims", partition=0, offset=0, key=None,
                   value=b'{"transfer_id":"x","from":"a","to":"b","amount":1}')


def _fill_statement(dialect: str) -> sa.TextClause:
    if dialect == "postgresql":
        return sa.text(
            "INSERT INTO exactlyonce_processed (scope, message_id, topic, kafka_partition, kafka_offset, "
            "fingerprint, outcome, processed_at) "
            "SELECT :scope, lpad(to_hex(g * CAST(:step AS bigint)), 15, '0') || '00000000000000000', 'claims', 0, g, "
            "repeat('f', 64), 'applied', timestamp '2020-01-01' + g * interval '1 millisecond' "
            "FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g")
    return sa.text(
        "WITH RECURSIVE s(g) AS (SELECT :lo UNION ALL SELECT g + 1 FROM s WHERE g < :hi) "
        "INSERT INTO exactlyonce_processed (scope, message_id, topic, kafka_partition, kafka_offset, "
        "fingerprint, outcome, processed_at) "
        "SELECT :scope, printf('%015x', g * :step) || '00000000000000000', 'claims', 0, g, "
        "printf('%064d', 0), 'applied', datetime(1577836800 + g / 1000, 'unixepoch') FROM s")


def fill(engine: Engine, rows: int, progress: Callable[[str], None]) -> float:
    """Add ``rows`` filler rows in chunks of a million; return the seconds it took."""
    started = time.monotonic()
    step = _KEY_SPACE // max(rows, 1)
    statement = _fill_statement(engine.dialect.name)
    for lo in range(1, rows + 1, _CHUNK):
        hi = min(lo + _CHUNK - 1, rows)
        with engine.begin() as conn:
            conn.execute(statement, {"scope": SCOPE, "step": step, "lo": lo, "hi": hi})
        progress(f"  filled {hi:,} / {rows:,} rows ({time.monotonic() - started:.0f} s)")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE exactlyonce_processed" if engine.dialect.name == "postgresql"
                             else "ANALYZE"))
    return time.monotonic() - started


def measure(engine: Engine, reps: int, singles: int) -> dict[str, Any]:
    """Time claim_many(500 fresh IDs) ``reps`` times and claim() ``singles`` times (after a warm-up)."""
    many: list[float] = []
    many_commit: list[float] = []
    single: list[float] = []
    for rep in range(reps + 3):
        items = [(uuid.uuid4().hex, _MESSAGE) for _ in range(BATCH)]
        started = time.perf_counter()
        with Session(engine) as session, session.begin():
            claimed = time.perf_counter()
            new = claim_many(session, SCOPE, items)
            elapsed = time.perf_counter() - claimed
        if len(new) != BATCH:
            raise RuntimeError(f"claimed {len(new)} of {BATCH} fresh IDs")
        if rep >= 3:
            many.append(elapsed * 1000)
            many_commit.append((time.perf_counter() - started) * 1000)
    for rep in range(singles + 20):
        with Session(engine) as session, session.begin():
            started = time.perf_counter()
            claim(session, SCOPE, uuid.uuid4().hex, _MESSAGE)
            elapsed = time.perf_counter() - started
        if rep >= 20:
            single.append(elapsed * 1000)
    return {"claim_many_p50_ms": percentile(many, 50), "claim_many_p99_ms": percentile(many, 99),
            "claim_many_txn_p50_ms": percentile(many_commit, 50),
            "claim_p50_ms": percentile(single, 50), "claim_p99_ms": percentile(single, 99)}


def truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM exactlyonce_processed" if engine.dialect.name == "sqlite"
                             else "TRUNCATE exactlyonce_processed"))


def bench_claims(url: str, rows: int, *, reps: int, singles: int,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure on an empty table, fill it with ``rows`` rows, measure again, empty it."""
    engine = _db.create_engine(url)
    try:
        truncate(engine)
        empty = measure(engine, reps, singles)
        progress(f"  empty table: claim_many(500) p50 {empty['claim_many_p50_ms']:.1f} ms, "
                 f"claim() p50 {empty['claim_p50_ms']:.2f} ms")
        truncate(engine)
        fill_s = fill(engine, rows, progress)
        full = measure(engine, reps, singles)
        progress(f"  {rows:,} rows: claim_many(500) p50 {full['claim_many_p50_ms']:.1f} ms, "
                 f"claim() p50 {full['claim_p50_ms']:.2f} ms")
        truncate(engine)
        return {"rows": rows, "fill_s": fill_s, "empty": empty, "full": full}
    finally:
        engine.dispose()
