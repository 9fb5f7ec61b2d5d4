"""(g) Claim latency against the size of the dedup table.

``claim_many`` of 500 fresh IDs and single ``claim()`` calls are timed on an
empty ``exactlyonce_processed``, then again after it was filled with
``rows`` rows of one scope. The filler IDs are 32 hex characters spread evenly
over the same key space as the fresh ones (uuid4 hex), and are inserted in key
order so that filling is fast; fresh IDs land all over the primary-key index,
as real random IDs do.

The same is measured for time-ordered IDs (``kind="uuid7"``): the filler is
UUIDv7 text in the format of :func:`exactlyonce.producer.new_message_id`,
stamped one millisecond apart in the past, and the fresh IDs are new ones from
that function, so they land at the right edge of the index, as a Producer's do.
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
from exactlyonce.producer import new_message_id
from exactlyonce.store import claim, claim_many

SCOPE = "bench:claims"
BATCH = 500
#: Filler IDs are ``lpad(hex(i * step), 15) + 17 zeros``: 32 hex characters, like uuid4().hex.
_KEY_SPACE = 2**60
_CHUNK = 1_000_000

_MESSAGE = Message(topic="claims", partition=0, offset=0, key=None,
                   value=b'{"transfer_id":"x","from":"a","to":"b","amount":1}')


#: The kinds of ID measured: name -> a fresh ID.
KINDS: dict[str, Callable[[], str]] = {"uuid4": lambda: uuid.uuid4().hex, "uuid7": new_message_id}


def _fill_statement_uuid7(dialect: str) -> sa.TextClause:
    """UUIDv7 text, 8-4-4-4-12: 48 bits of milliseconds (``:base`` + g, in the past), version 7, variant 2."""
    if dialect == "postgresql":
        hex_ = "lpad(to_hex(CAST(:base AS bigint) + g), 12, '0')"
        tail = "lpad(to_hex(g), 12, '0')"
        text = (f"substr({hex_}, 1, 8) || '-' || substr({hex_}, 9, 4) || '-7000-8000-' || {tail}")
        return sa.text(
            "INSERT INTO exactlyonce_processed (scope, message_id, topic, kafka_partition, kafka_offset, "
            f"fingerprint, outcome, processed_at) SELECT :scope, {text}, 'claims', 0, g, repeat('f', 64), "
            "'applied', timestamp '2020-01-01' + g * interval '1 millisecond' "
            "FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g")
    hex_ = "printf('%012x', :base + g)"
    text = f"substr({hex_}, 1, 8) || '-' || substr({hex_}, 9, 4) || '-7000-8000-' || printf('%012x', g)"
    return sa.text(
        "WITH RECURSIVE s(g) AS (SELECT :lo UNION ALL SELECT g + 1 FROM s WHERE g < :hi) "
        "INSERT INTO exactlyonce_processed (scope, message_id, topic, kafka_partition, kafka_offset, "
        f"fingerprint, outcome, processed_at) SELECT :scope, {text}, 'claims', 0, g, printf('%064d', 0), "
        "'applied', datetime(1577836800 + g / 1000, 'unixepoch') FROM s")


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


def fill(engine: Engine, rows: int, progress: Callable[[str], None], kind: str = "uuid4") -> float:
    """Add ``rows`` filler rows of ``kind`` IDs in chunks of a million; return the seconds it took."""
    started = time.monotonic()
    step = _KEY_SPACE // max(rows, 1)
    # uuid7: the last filler ID is stamped a minute before now, the others a millisecond apart before it.
    base = time.time_ns() // 1_000_000 - 60_000 - rows
    statement = (_fill_statement_uuid7 if kind == "uuid7" else _fill_statement)(engine.dialect.name)
    for lo in range(1, rows + 1, _CHUNK):
        hi = min(lo + _CHUNK - 1, rows)
        with engine.begin() as conn:
            conn.execute(statement, {"scope": SCOPE, "step": step, "lo": lo, "hi": hi, "base": base})
        progress(f"  filled {hi:,} / {rows:,} rows ({time.monotonic() - started:.0f} s)")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE exactlyonce_processed" if engine.dialect.name == "postgresql"
                             else "ANALYZE"))
    return time.monotonic() - started


def measure(engine: Engine, reps: int, singles: int, kind: str = "uuid4") -> dict[str, Any]:
    """Time claim_many(500 fresh IDs) ``reps`` times and claim() ``singles`` times (after a warm-up)."""
    fresh = KINDS[kind]
    many: list[float] = []
    many_commit: list[float] = []
    single: list[float] = []
    for rep in range(reps + 3):
        items = [(fresh(), _MESSAGE) for _ in range(BATCH)]
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
            claim(session, SCOPE, fresh(), _MESSAGE)
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
    """For each ID kind: measure on an empty table, fill it with ``rows`` rows, measure again, empty it."""
    engine = _db.create_engine(url)
    result: dict[str, Any] = {"rows": rows}
    try:
        for kind in KINDS:
            truncate(engine)
            empty = measure(engine, reps, singles, kind)
            progress(f"  {kind}, empty table: claim_many(500) p50 {empty['claim_many_p50_ms']:.1f} ms, "
                     f"claim() p50 {empty['claim_p50_ms']:.2f} ms")
            truncate(engine)
            fill_s = fill(engine, rows, progress, kind)
            full = measure(engine, reps, singles, kind)
            progress(f"  {kind}, {rows:,} rows: claim_many(500) p50 {full['claim_many_p50_ms']:.1f} ms, "
                     f"claim() p50 {full['claim_p50_ms']:.2f} ms")
            truncate(engine)
            result[kind] = {"fill_s": fill_s, "empty": empty, "full": full}
        return result
    finally:
        engine.dispose()
