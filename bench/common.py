"""Shared pieces of the benchmark: databases, topics, the producer, the workload."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import kafka
import kafka.errors
import sqlalchemy as sa
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from exactlyonce import _db, migrate
from examples.transfer import models
from examples.transfer.models import transfers

ROOT = Path(__file__).resolve().parents[1]

#: The PostgreSQL database the benchmark owns (created when missing).
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/exactlyonce_bench"
POSTGRES_URL_ENV = "BENCH_POSTGRES_URL"

#: Huge balances: a transfer never overdraws, so every one is applied.
BALANCE = 10**12

#: The hand-written loop's dedup table (variant b): just the ID.
bench_metadata = sa.MetaData()
naive_dedup = sa.Table(
    "bench_naive_dedup",
    bench_metadata,
    sa.Column("message_id", sa.String(255), primary_key=True),
)

# -- small helpers -----------------------------------------------------------


def account_id(index: int) -> str:
    """The ID of the ``index``-th bench account (``acct-000042``); matches the seeding SQL."""
    return f"acct-{index:06d}"


# -- databases ---------------------------------------------------------------


def postgres_url(explicit: str | None = None) -> str:
    """The benchmark's PostgreSQL URL; refuses database ``test`` (the test suite's)."""
    url = explicit or os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    if make_url(url).database in ("test", "postgres", None, ""):
        raise SystemExit(f"refusing to benchmark in database {make_url(url).database!r}: "
                         "use a dedicated one (default exactlyonce_bench)")
    return url


def ensure_postgres_database(url: str) -> None:
    """Create the URL's database if it is missing (connecting to database ``postgres``)."""
    parsed = _db.normalize_url(url)
    name = parsed.database
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def prepare_schema(url: str) -> None:
    """exactlyonce's tables (Alembic), the transfer example's tables and the bench's own."""
    engine = _db.create_engine(url)

    def prepare() -> None:
        migrate.upgrade(engine)
        models.metadata.create_all(engine)
        bench_metadata.create_all(engine)

    try:
        retry_transient(prepare)
    finally:
        engine.dispose()


def seed_accounts(conn: sa.Connection, n_accounts: int) -> None:
    """Insert accounts ``acct-000000`` .. with :data:`BALANCE` each, in one statement."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(
            "INSERT INTO accounts (id, balance) SELECT 'acct-' || lpad(g::text, 6, '0'), :b "
            "FROM generate_series(0, :n - 1) AS g"), {"n": n_accounts, "b": BALANCE})
    else:
        conn.execute(sa.text(
            "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < :n - 1) "
            "INSERT INTO accounts (id, balance) SELECT printf('acct-%06d', i), :b FROM s"),
            {"n": n_accounts, "b": BALANCE})


T = TypeVar("T")


def retry_transient(fn: Callable[[], T], *, budget_s: float = 90.0) -> T:
    """Call ``fn``, retrying transient database errors (a PostgreSQL restart) for ``budget_s``."""
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return fn()
        except sa.exc.SQLAlchemyError as exc:
            if not _db.is_transient(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def reset_postgres(url: str, n_accounts: int) -> None:
    """Empty every bench table and re-seed the accounts (before each PostgreSQL run)."""
    engine = _db.create_engine(url)

    def reset() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "TRUNCATE exactlyonce_processed, exactlyonce_counters, transfers, accounts, bench_naive_dedup"))
            seed_accounts(conn, n_accounts)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))

    try:
        retry_transient(reset)
    finally:
        engine.dispose()


class SqliteFiles:
    """Fresh SQLite databases copied from one prepared, seeded template file."""

    def __init__(self, directory: Path, n_accounts: int) -> None:
        self.directory = directory
        self.template = directory / "template.db"
        self._serial = 0
        url = f"sqlite:///{self.template}"
        prepare_schema(url)
        engine = _db.create_engine(url)
        try:
            with engine.begin() as conn:
                seed_accounts(conn, n_accounts)
        finally:
            engine.dispose()  # the last connection closing checkpoints the WAL into the file

    def fresh(self, name: str) -> str:
        """Copy the template to a new file; return its URL."""
        self._serial += 1
        path = self.directory / f"{self._serial:02d}-{name}.db"
        shutil.copyfile(self.template, path)
        return f"sqlite:///{path}"

    def remove(self, url: str) -> None:
        """Delete a database made by :meth:`fresh` (and its WAL files)."""
        path = Path(make_url(url).database or "")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def count_processed(engine: Engine) -> int:
    """Rows in exactlyonce's dedup table."""

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM exactlyonce_processed")).scalar_one())

    return retry_transient(count)


def check_database(url: str, committed: int, *, accounts: int, naive: bool = False,
                   writes: bool = True) -> dict[str, Any]:
    """Self-check of a finished run: each of the ``committed`` records applied exactly once.

    Dedup rows (exactlyonce's, or the hand-written loop's table when ``naive``)
    == ``committed``; transfer rows == distinct transfer IDs == ``committed``
    (0 when the handler ``writes`` nothing); the sum of balances == the seeded
    sum. Returns ``{"ok": bool, "detail": str}``.
    """
    dedup_table = "bench_naive_dedup" if naive else "exactlyonce_processed"
    engine = _db.create_engine(url)
    try:
        with engine.connect() as conn:
            dedup = int(conn.execute(sa.text(f"SELECT count(*) FROM {dedup_table}")).scalar_one())
            rows, distinct = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT transfer_id) FROM transfers")).one()
            total = int(conn.execute(sa.text("SELECT coalesce(sum(balance), 0) FROM accounts")).scalar_one())
    finally:
        engine.dispose()
    expected_rows = committed if writes else 0
    problems = []
    if dedup != committed:
        problems.append(f"{dedup:,} dedup rows for {committed:,} records committed")
    if rows != expected_rows or distinct != rows:
        problems.append(f"{rows:,} transfer rows ({distinct:,} distinct IDs), expected {expected_rows:,}")
    if total != accounts * BALANCE:
        problems.append(f"total balance {total:,} != {accounts * BALANCE:,}")
    detail = "; ".join(problems) or (f"{committed:,} records: {dedup:,} dedup rows, {rows:,} transfer rows, "
                                     "balance conserved")
    return {"ok": not problems, "detail": detail}


#: Hot accounts of the contention case: every transfer of a ``hot`` topic pays one of these.
HOT_ACCOUNTS = 5


# -- the workload ------------------------------------------------------------

_ADD_TO_BALANCE = sa.text("UPDATE accounts SET balance = balance + :delta WHERE id = :id")


def apply_transfers_batch(session: Session, batch: Sequence[dict[str, Any]]) -> None:
    """Variant (d): the transfers of a batch in a few set-based statements.

    Still two balance updates and one transfer row per transfer, but sent as
    one ``executemany`` of UPDATEs (in account order, so that concurrent
    workers lock rows in the same order and never deadlock) and one multi-row
    INSERT. Balances are huge: there is no overdraft rule to check.
    """
    updates = []
    rows = []
    for t in batch:
        updates.append({"id": t["from"], "delta": -t["amount"]})
        updates.append({"id": t["to"], "delta": t["amount"]})
        rows.append({"transfer_id": t["transfer_id"], "from_account": t["from"], "to_account": t["to"],
                     "amount": t["amount"], "status": models.APPLIED, "reason": None})
    updates.sort(key=lambda u: u["id"])
    session.execute(_ADD_TO_BALANCE, updates)
    session.execute(sa.insert(transfers), rows)


# -- Kafka -------------------------------------------------------------------


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    """Create ``name`` and wait until its partitions are visible."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
    except kafka.errors.TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 30
        while len(consumer.partitions_for_topic(name) or ()) < partitions:
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} did not appear")
            time.sleep(0.1)
            consumer.topics()  # refreshes the metadata
    finally:
        consumer.close()


def transfer_payload(prefix: str, index: int, n_accounts: int, rng: random.Random,
                     hot: bool = False) -> dict[str, Any]:
    """One transfer between two distinct random accounts, stamped with the send time.

    ``hot``: the target is one of the first :data:`HOT_ACCOUNTS` accounts
    (the source one of the others), so that concurrent workers contend on them.
    """
    if hot:
        source, target = rng.randrange(HOT_ACCOUNTS, n_accounts), rng.randrange(HOT_ACCOUNTS)
    else:
        source, target = rng.sample(range(n_accounts), 2) if n_accounts < 64 else _two(rng, n_accounts)
    return {"transfer_id": f"{prefix}-{index:09d}", "from": account_id(source), "to": account_id(target),
            "amount": rng.randint(1, 2500), "sent_at": time.time()}


def _two(rng: random.Random, n: int) -> tuple[int, int]:
    source = rng.randrange(n)
    target = rng.randrange(n - 1)
    return source, target + (target >= source)


def _produce_range(bootstrap: str, topic: str, prefix: str, start: int, stop: int,
                   n_accounts: int, partitions: int, hot: bool = False) -> int:
    """Send transfers ``start`` .. ``stop - 1`` (round robin over partitions); return the acknowledged count."""
    rng = random.Random(f"{prefix}-{start}")
    failures: list[BaseException] = []
    producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20,
                                   batch_size=256 * 1024, max_request_size=4 * 1024 * 1024)
    try:
        for index in range(start, stop):
            value = json.dumps(transfer_payload(prefix, index, n_accounts, rng, hot), separators=(",", ":"))
            producer.send(topic, value=value.encode(), partition=index % partitions).add_errback(
                failures.append)
        producer.flush()
    finally:
        producer.close(timeout=30)
    if failures:
        raise RuntimeError(f"{len(failures)} sends failed, first: {failures[0]!r}")
    return stop - start


def produce_transfers(bootstrap: str, topic: str, count: int, *, prefix: str, n_accounts: int,
                      partitions: int, processes: int = 2, hot: bool = False, create: bool = True) -> float:
    """Create ``topic`` (unless not ``create``) and fill it with ``count`` transfers; return the seconds it took.

    Large topics are produced by ``processes`` processes in parallel.
    """
    if create:
        create_topic(bootstrap, topic, partitions)
    started = time.monotonic()
    if count < 20_000 or processes < 2:
        _produce_range(bootstrap, topic, prefix, 0, count, n_accounts, partitions, hot)
    else:
        bounds = [count * k // processes for k in range(processes + 1)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as pool:
            sent = pool.starmap(_produce_range, [(bootstrap, topic, prefix, lo, hi, n_accounts, partitions, hot)
                                                 for lo, hi in itertools.pairwise(bounds)])
        if sum(sent) != count:
            raise RuntimeError(f"produced {sum(sent)} of {count}")
    return time.monotonic() - started


def paced_produce(bootstrap: str, topic: str, count: int, rate: float, *, prefix: str, n_accounts: int) -> None:
    """Send ``count`` transfers at ``rate`` per second, each stamped when it is sent (latency phase)."""
    rng = random.Random(prefix)
    producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    try:
        started = time.monotonic()
        for index in range(count):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            value = json.dumps(transfer_payload(prefix, index, n_accounts, rng), separators=(",", ":"))
            producer.send(topic, value=value.encode())
        producer.flush()
    finally:
        producer.close(timeout=30)
