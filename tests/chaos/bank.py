"""A Jepsen-style bank test of exactlyonce under faults, through both example services.

Accounts and thousands of transfers (a share re-sent, some onto another
partition) flow through transfer workers running :mod:`tests.chaos.service`
against PostgreSQL. Each applied transfer stores two statement entries in
the outbox; standalone relays (``python -m exactlyonce relay``) send them to
the ``transfer-applied`` topic, and ledger workers (the example's
``examples.ledger.service:app``, ``sequence=`` per account) write the
statements. Faults are injected at random (seeded), each on a process chosen
at random among all of them (transfer workers, relays, ledger workers):

- ``kill``: SIGKILL a process, start a replacement of the same kind;
- ``zombie``: SIGSTOP a process past the session timeout, then SIGCONT;
- ``db-restart``: restart PostgreSQL;
- ``cut``: cut every broker connection through the fault proxy;

and, when the bank runs on a three-node Apache Kafka cluster
(``run_bank(cluster=...)``; topics with replication factor 3 and
``min.insync.replicas=2``), broker faults:

- ``leader-kill``: SIGKILL the broker leading most partitions of the transfer
  topic, wait until transfers are applied again without it, restart it;
- ``coordinator-kill``: the same for the broker coordinating the transfer
  workers' group;
- ``cluster-restart``: stop every broker, start them again with their data;

each reported with the time until transfers were applied again (``resume``).
Faults are drawn in shuffled rounds, so every kind occurs once per round.

with bad records mixed in: non-JSON values, poison transfers the handler
always fails on, transfer IDs re-sent with a different amount, oversized
values; and stray copies of statement events (outbox rows, often not yet
relayed) sent onto another partition of ``transfer-applied``, as a relay
re-send after a repartition would, so they can arrive before their turn.

The checker then reports transfers applied once, applied twice (must be 0),
lost (must be 0), dead letters (must be exactly the bad records sent), and
balances against the ledger recomputed from the applied transfers; and runs
the ledger verification (:func:`examples.ledger.verify.verify_ledger`): every
applied transfer has exactly one debit and one credit line, each account's
lines are numbered 1..N without gaps or repeats, the running balances replay
to the final balances, no event is left parked or dead-lettered, and the
outbox is empty.

``python -m tests.chaos.bank --duration 600 --seed 7`` runs a soak
(``make chaos``; ``--cluster`` on a three-node Kafka cluster, ``make
cluster-chaos``; ``--async-handler`` with an ``async def`` transfer handler,
``make chaos ASYNC=1``); ``tests/chaos/test_bank.py`` runs about a minute of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kafka
import sqlalchemy as sa
from kafka.partitioner import murmur2
from kafka.structs import TopicPartition

import exactlyonce
from exactlyonce import _db, migrate
from exactlyonce.embedded import free_port
from exactlyonce.schema import counters, outbox, parked, processed, sequence_streams
from examples.ledger import models as ledger_models
from examples.ledger.verify import verify_ledger
from examples.transfer import models
from examples.transfer.producer import ensure_topic, make_transfers, send_transfers
from tests.faultproxy import FaultProxy
from tests.services.brokers import private_broker
from tests.services.kafka import KafkaCluster

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = "postgresql://postgres:postgres@127.0.0.1:5432/test"
#: Faults that need a three-node cluster (``run_bank(cluster=...)``).
BROKER_FAULTS = ("leader-kill", "coordinator-kill", "cluster-restart")
#: How long transfers may stay stalled after a broker fault before the run fails.
RESUME_LIMIT_S = 90.0
SESSION_TIMEOUT_MS = 6000
#: How much longer than its duration a run may go on to inject the faults still owed (``min_faults``).
MAX_EXTENSION_S = 300.0
INITIAL_BALANCE = 100_000
#: The workers dead-letter larger values as oversized.
MAX_VALUE_BYTES = 4096
#: Problems of the ledger verification copied into the report; beyond that they are counted.
MAX_LEDGER_PROBLEMS = 10

#: The kinds of process, each started with ``python -m exactlyonce ...``:
#: the transfer workers (the example's handler plus a journal), the outbox
#: relays, and the example's ledger service.
COMMANDS = {
    "transfer": ["run", "tests.chaos.service:app"],
    "relay": ["relay"],
    "ledger": ["run", "examples.ledger.service:app"],
}

#: Set (to "1") for the transfer workers to run the async def variant of their handler.
ASYNC_HANDLER_ENV = "CHAOS_ASYNC_HANDLER"

#: One row per handler run that committed, with no unique constraint: a
#: transfer applied twice shows as two rows, although the example's own
#: ``transfers`` table has the transfer ID as its primary key.
journal_metadata = sa.MetaData()
journal = sa.Table(
    "chaos_journal",
    journal_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transfer_id", sa.String(64), nullable=False, index=True),
    sa.Column("worker_pid", sa.Integer, nullable=False),
)


@dataclass
class Report:
    """What the checker found. ``ok`` is the verdict."""

    seed: int
    duration_s: float
    workers: int
    relays: int = 0
    ledger_workers: int = 0
    #: The transfer workers' handler: ``sync`` (a def) or ``async`` (an async def, tests/chaos/service.py).
    handler: str = "sync"
    transfers: int = 0
    records_sent: int = 0
    resent: int = 0
    applied_once: int = 0
    applied_twice: int = 0
    lost: int = 0
    phantom: int = 0
    rejected: int = 0
    transfer_duplicates: int = 0
    bad_sent: int = 0
    dead_lettered: int = 0
    dead_letter_records: int = 0
    dead_letters_missing: int = 0
    dead_letters_unexpected: int = 0
    mismatch_applied_wrong_amount: int = 0
    money_before: int = 0
    money_after: int = 0
    balance_mismatches: int = 0
    negative_balances: int = 0
    #: Statement events stored in the outbox, still unsent at the end, and
    #: records on the ``transfer-applied`` topic (originals, relay re-sends
    #: and the stray copies the test sent itself).
    events: int = 0
    outbox_pending: int = 0
    event_records: int = 0
    stray_copies: int = 0
    relay_resends: int = 0
    #: The ledger: statement lines, sequence streams (accounts), events parked
    #: at some point (counted when parked) and left parked at the end,
    #: duplicates skipped (at or below the watermark), dead-lettered.
    ledger_lines: int = 0
    ledger_streams: int = 0
    ledger_parked: int = 0
    ledger_parked_left: int = 0
    ledger_duplicates: int = 0
    ledger_dead_lettered: int = 0
    ledger_missing: int = 0
    ledger_doubled: int = 0
    ledger_misnumbered: int = 0
    ledger_balances_off: int = 0
    ledger_line: str = ""
    exit_codes: dict[str, list[int]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    #: Broker faults: seconds from the fault (for a cluster restart, from the
    #: restart) until the next transfer was applied, by kind.
    resume: dict[str, list[float]] = field(default_factory=dict)
    #: Faults aimed at a process (kill, zombie), by the kind of process hit.
    victims: dict[str, int] = field(default_factory=dict)
    catch_up_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was lost, doubled or misrouted, money is conserved and the ledger verifies."""
        return not self.problems

    def summary(self) -> str:
        """Three lines of figures: the transfers, the ledger, the faults and the verdict."""
        return (
            f"seed={self.seed} duration={self.duration_s:.0f}s handler={self.handler} "
            f"processes=transfer:{self.workers},"
            f"relay:{self.relays},ledger:{self.ledger_workers} "
            f"transfers={self.transfers} records={self.records_sent} resent={self.resent} "
            f"applied_once={self.applied_once} applied_twice={self.applied_twice} lost={self.lost} "
            f"rejected={self.rejected} duplicates_skipped={self.transfer_duplicates} "
            f"bad_sent={self.bad_sent} dead_lettered={self.dead_lettered} "
            f"(dlq records {self.dead_letter_records}) money={self.money_before}->{self.money_after} "
            f"balance_mismatches={self.balance_mismatches}\n"
            f"ledger: events={self.events} outbox_pending={self.outbox_pending} "
            f"event_records={self.event_records} (relay_resends={self.relay_resends} "
            f"stray_copies={self.stray_copies}) lines={self.ledger_lines} streams={self.ledger_streams} "
            f"missing={self.ledger_missing} doubled={self.ledger_doubled} misnumbered={self.ledger_misnumbered} "
            f"balances_off={self.ledger_balances_off} duplicates_skipped={self.ledger_duplicates} "
            f"parked={self.ledger_parked} parked_left={self.ledger_parked_left} "
            f"dead_lettered={self.ledger_dead_lettered}\n"
            f"faults={self.faults} victims={self.victims} catch_up={self.catch_up_s:.1f}s "
            f"{self.resume_line()}"
            f"exit_codes={self.exit_codes} "
            f"{'OK' if self.ok else 'FAILED: ' + '; '.join(self.problems)}"
        )


    def resume_line(self) -> str:
        """``resume: leader-kill max 4.1s mean 3.2s (3), ...`` or nothing without broker faults."""
        if not self.resume:
            return ""
        parts = [f"{kind} max {max(times):.1f}s mean {sum(times) / len(times):.1f}s ({len(times)})"
                 for kind, times in sorted(self.resume.items()) if times]
        return "resume: " + ", ".join(parts) + " "


class Processes:
    """The processes under test, each ``python -m exactlyonce`` with one of :data:`COMMANDS`."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.kinds: dict[int, str] = {}
        self.stopped: set[int] = set()
        self._started: Counter[str] = Counter()

    def start(self, kind: str) -> subprocess.Popen[bytes]:
        self._started[kind] += 1
        log = open(self._log_dir / f"{kind}-{self._started[kind]}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "exactlyonce", *COMMANDS[kind]],
            env=self._env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        self.kinds[proc.pid] = kind
        return proc

    def alive(self, kind: str | None = None) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None and kind in (None, self.kinds[p.pid])]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs.remove(proc)
        self.stopped.discard(proc.pid)

    def resume_all(self) -> None:
        for proc in self.alive():
            if proc.pid in self.stopped:
                proc.send_signal(signal.SIGCONT)
        self.stopped.clear()

    def terminate_all(self, timeout_s: float = 60) -> dict[str, list[int]]:
        self.resume_all()
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        codes: dict[str, list[int]] = {}
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            codes.setdefault(self.kinds[proc.pid], []).append(code)
        return codes


def restart_postgres() -> None:
    """Restart the local PostgreSQL cluster; always leave it started."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    try:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                       check=True, timeout=120, capture_output=True)
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                       timeout=120, capture_output=True)


def can_restart_postgres(url: str) -> bool:
    """Whether ``url`` is this machine's PostgreSQL cluster, which root can restart with pg_ctlcluster."""
    parsed = sa.engine.make_url(url)
    return (parsed.get_backend_name() == "postgresql"
            and parsed.host in ("127.0.0.1", "localhost") and parsed.port in (None, 5432)
            and os.path.isdir("/etc/postgresql") and os.geteuid() == 0)


def _prepare_database(url: str, accounts: int) -> tuple[sa.Engine, dict[str, int]]:
    engine = _db.create_engine(url)
    ledger_models.drop_schema(engine)
    models.drop_schema(engine)
    journal_metadata.drop_all(engine)
    migrate.downgrade(engine, "base")
    migrate.upgrade(engine)
    models.create_schema(engine)
    ledger_models.create_schema(engine)
    journal_metadata.create_all(engine)
    return engine, models.seed_accounts(engine, accounts, INITIAL_BALANCE)


def _applied_transfer(engine: sa.Engine, by_id: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A transfer already recorded by the service (so surely sent and consumed), if any."""
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(models.transfers.c.transfer_id)
                               .order_by(sa.func.random()).limit(1)).first()
    except sa.exc.OperationalError:
        return None
    return by_id.get(row[0]) if row else None


def _send_bad_records(bootstrap: str, topic: str, engine: sa.Engine, by_id: dict[str, dict[str, Any]],
                      count: int) -> dict[tuple[int, int], str]:
    """Send ``count`` bad records; return their coordinates -> expected reason."""
    producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    expected: dict[tuple[int, int], str] = {}
    try:
        for n in range(count):
            kind = ("not-json", "poison", "mismatch", "oversized")[(n + int(time.monotonic())) % 4]
            original = _applied_transfer(engine, by_id) if kind == "mismatch" else None
            if kind == "mismatch" and original is None:
                kind = "poison"
            key = b"bad"
            if kind == "not-json":
                value = f"{{not json {uuid.uuid4()}".encode()
                reason = "undecodable-value"
            elif kind == "poison":
                value = json.dumps({"transfer_id": f"poison-{uuid.uuid4()}", "from": "acct-0000",
                                    "to": "acct-0001", "amount": 1, "poison": True}).encode()
                reason = "handler-error"
            elif kind == "oversized":
                value = json.dumps({"transfer_id": f"big-{uuid.uuid4()}", "pad": "x" * MAX_VALUE_BYTES}
                                   ).encode()
                reason = "oversized-value"
            else:
                # The same transfer ID with another amount, after the original
                # was applied: the copy must be refused, not skipped or applied.
                assert original is not None
                changed = {**original, "amount": original["amount"] + 1}
                value = json.dumps(changed, separators=(",", ":")).encode()
                key = original["from"].encode()
                reason = "fingerprint-mismatch"
            meta = producer.send(topic, key=key, value=value).get(timeout=30)
            expected[(meta.partition, meta.offset)] = reason
    finally:
        producer.close(timeout=10)
    return expected


def _send_stray_copies(bootstrap: str, topic: str, partitions: int, engine: sa.Engine,
                       rng: random.Random, count: int) -> int:
    """Send copies of ``count`` statement events onto another partition than their key's; return how many.

    Mostly events still pending in the outbox, so a copy often arrives before
    the account's earlier events and must be parked; the original, relayed
    later, is then a duplicate. What a relay killed after sending, with the
    topic repartitioned meanwhile, would do.
    """
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(outbox).where(outbox.c.sent_at.is_(None))
                                     .order_by(sa.func.random()).limit(count - 1)).all())
            rows += conn.execute(sa.select(outbox).order_by(sa.func.random()).limit(count - len(rows))).all()
    except sa.exc.DBAPIError:  # PostgreSQL just restarted
        return 0
    if not rows or partitions < 2:
        return 0
    with exactlyonce.Producer(bootstrap) as producer:
        for row in rows:
            home = int(murmur2(row.key) & 0x7FFFFFFF) % partitions
            other = rng.choice([p for p in range(partitions) if p != home])
            producer.send(row.topic, row.value, key=row.key, message_id=row.message_id, partition=other)
    return len(rows)


def _read_dead_letters(bootstrap: str, topic: str) -> list[dict[str, str]]:
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                   consumer_timeout_ms=3000)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(partitions)
    letters = []
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                letters.append({k: v.decode() for k, v in record.headers or ()})
    consumer.close()
    return letters


def _read_event_ids(bootstrap: str, topic: str) -> Counter[str]:
    """How many records of ``topic`` carry each message ID, read to the end.

    Read, not summed from the end offsets: the embedded broker's end offsets
    of batched records can be lower than the number of records.
    """
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                   consumer_timeout_ms=5000, max_partition_fetch_bytes=4 << 20)
    ids: Counter[str] = Counter()
    try:
        consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())])
        consumer.seek_to_beginning()
        for record in consumer:
            ids[dict(record.headers or ()).get("message-id", b"").decode()] += 1
    finally:
        consumer.close()
    return ids


def run_bank(*, duration_s: float = 60, seed: int = 0, database_url: str = DEFAULT_DATABASE_URL,
             workers: int = 3, relays: int = 2, ledger_workers: int = 2, accounts: int = 40,
             partitions: int = 6, applied_partitions: int = 4, rate: float = 150.0,
             faults: tuple[str, ...] = ("kill", "zombie", "cut", "db-restart"),
             log_dir: Path | None = None, out: Any = print, cluster: KafkaCluster | None = None,
             async_handler: bool = False, min_faults: dict[str, int] | None = None) -> Report:
    """Run the bank and its ledger under faults for ``duration_s`` and check them.

    Without ``cluster`` the bank runs on a broker of its own behind a fault
    proxy; with one, on that running cluster (and may inject
    :data:`BROKER_FAULTS`). ``async_handler``: the transfer workers run the
    ``async def`` variant of their handler (:mod:`tests.chaos.service`).
    ``min_faults``: kinds that must be injected at least so many times; when
    ``duration_s`` is over and some are still owed, the run goes on (at most
    :data:`MAX_EXTENSION_S` longer) injecting only those, with transfers still
    being sent, instead of ending short of them on a slow machine.
    """
    rng = random.Random(seed)
    report = Report(seed=seed, duration_s=duration_s, workers=workers, relays=relays,
                    ledger_workers=ledger_workers, handler="async" if async_handler else "sync")
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"exactlyonce-chaos-{seed}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    injected: Counter[str] = Counter()
    victims: Counter[str] = Counter()
    fault_kinds = [f for f in faults if f != "db-restart" or can_restart_postgres(database_url)]
    if cluster is None and set(fault_kinds) & set(BROKER_FAULTS):
        raise ValueError(f"{sorted(set(fault_kinds) & set(BROKER_FAULTS))} need a cluster")
    if cluster is not None:
        fault_kinds = [f for f in fault_kinds if f != "cut"]  # no proxy in front of a cluster
    rounds: list[str] = []
    run_id = f"{seed}-{uuid.uuid4().hex[:8]}"
    topic, group = f"chaos-{run_id}", "chaos-bank"
    applied_topic, ledger_group = f"chaos-applied-{run_id}", "chaos-ledger"
    scopes = Scopes(transfer=f"{group}:{topic}", ledger=f"{ledger_group}:{applied_topic}")
    wanted = {"transfer": workers, "relay": relays, "ledger": ledger_workers}

    broker_port, proxy_port = free_port(), free_port()
    bad_expected: dict[tuple[int, int], str] = {}
    resume: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        proxy: FaultProxy | None = None
        if cluster is None:
            bootstrap = stack.enter_context(private_broker(broker_port, advertised_port=proxy_port))
            proxy = stack.enter_context(FaultProxy(broker_port, port=proxy_port))
            replication = 1
        else:
            bootstrap, replication = cluster.bootstrap_servers, min(cluster.size, 3)
        engine, balances_before = _prepare_database(database_url, accounts)
        report.money_before = sum(balances_before.values())
        for name, count in ((topic, partitions), (f"{topic}.dlq", 1),
                            (applied_topic, applied_partitions), (f"{applied_topic}.dlq", 1)):
            ensure_topic(bootstrap, name, count, replication)
        consumer_config = json.dumps({"session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": 1000})
        env = {
            **os.environ,
            "EXACTLYONCE_BOOTSTRAP_SERVERS": bootstrap,
            "EXACTLYONCE_DATABASE_URL": database_url,
            "CHAOS_TOPIC": topic,
            "CHAOS_GROUP": group,
            "CHAOS_CONSUMER_CONFIG": consumer_config,
            ASYNC_HANDLER_ENV: "1" if async_handler else "",
            # Read by examples.transfer.service (where apply_transfer
            # publishes) and by examples.ledger.service (what it consumes).
            "EXACTLYONCE_TRANSFER_APPLIED_TOPIC": applied_topic,
            "EXACTLYONCE_LEDGER_GROUP": ledger_group,
            "EXACTLYONCE_LEDGER_CONSUMER_CONFIG": consumer_config,
            "PYTHONPATH": str(ROOT),
            "EXACTLYONCE_LOG_LEVEL": "INFO",
        }
        pool = Processes(env, log_dir)
        for kind, count in wanted.items():
            for _ in range(count):
                pool.start(kind)

        # Valid traffic, paced over most of the run, in a thread.
        produce_s = max(5.0, duration_s * 0.75)
        traffic = Traffic(bootstrap, topic, make_transfers(int(rate * (produce_s + MAX_EXTENSION_S)), accounts,
                                                           seed=str(seed)),
                          planned=int(rate * produce_s), rate=rate, seed=str(seed))
        by_id = traffic.by_id
        owed = Counter(min_faults or {})

        started = time.monotonic()
        try:
            while True:
                elapsed, still_owed = time.monotonic() - started, sorted(+(owed - injected))
                overtime = elapsed >= duration_s
                if overtime and (not still_owed or elapsed >= duration_s + MAX_EXTENSION_S):
                    break
                if overtime:
                    traffic.extended.set()
                time.sleep(rng.uniform(2.0, 5.0))
                bad_expected.update(_send_bad_records(bootstrap, topic, engine, by_id, 2))
                report.stray_copies += _send_stray_copies(bootstrap, applied_topic, applied_partitions,
                                                          engine, rng, 5)
                if not rounds:
                    rounds = rng.sample(fault_kinds, len(fault_kinds))
                kind = rounds.pop()
                if overtime and kind not in still_owed:
                    kind = still_owed[0]  # past the duration: only what is still owed
                injected[kind] += 1
                if kind == "kill":
                    candidates = pool.alive()
                    if candidates:
                        victim = rng.choice(candidates)
                        victims[pool.kinds[victim.pid]] += 1
                        pool.kill(victim)
                        pool.start(pool.kinds[victim.pid])
                elif kind == "zombie":
                    candidates = [p for p in pool.alive() if p.pid not in pool.stopped]
                    if candidates:
                        victim = rng.choice(candidates)
                        victims[pool.kinds[victim.pid]] += 1
                        victim.send_signal(signal.SIGSTOP)
                        pool.stopped.add(victim.pid)
                        pause = SESSION_TIMEOUT_MS / 1000 + rng.uniform(1.0, 3.0)
                        threading.Timer(pause, _resume, args=(pool, victim)).start()
                elif kind == "db-restart":
                    restart_postgres()
                elif kind in BROKER_FAULTS:
                    assert cluster is not None
                    seconds = _broker_fault(kind, cluster, topic, group, engine, rng)
                    if seconds is None:
                        report.problems.append(f"{kind}: no transfer applied within {RESUME_LIMIT_S:.0f}s")
                    else:
                        resume.setdefault(kind, []).append(seconds)
                        out(f"{kind}: transfers applied again after {seconds:.1f}s")
                else:
                    assert proxy is not None
                    proxy.cut()
            if not traffic.finish(timeout_s=300):
                report.problems.append("producer did not finish")
            if traffic.error is not None:
                report.problems.append(f"producer failed: {traffic.error!r}")
            # Faults stop; let the groups settle and catch up.
            pool.resume_all()
            for kind, count in wanted.items():
                while len(pool.alive(kind)) < count:
                    pool.start(kind)
            catch_up_started = time.monotonic()
            # The backlog left when the faults stop grows with the run (a soak's
            # services fall further behind than a minute's).
            deadline = catch_up_started + max(240.0, duration_s)
            while time.monotonic() < deadline:
                if _caught_up(engine, scopes, len(traffic.sent), len(bad_expected)):
                    break
                time.sleep(1.0)
            report.catch_up_s = time.monotonic() - catch_up_started
        finally:
            report.exit_codes = pool.terminate_all()
        report.faults = dict(injected)
        report.victims = dict(victims)
        report.resume = resume
        transfers = traffic.sent
        expected_ids = {t["transfer_id"] for t in transfers}
        report.transfers = len(transfers)
        report.records_sent = sum(r.records for r in traffic.reports)
        report.resent = sum(r.resent for r in traffic.reports)
        event_ids = _read_event_ids(bootstrap, applied_topic)
        _check(report, engine, expected_ids, transfers, bad_expected, balances_before,
               _read_dead_letters(bootstrap, f"{topic}.dlq"), topic)
        _check_ledger(report, engine, balances_before, scopes, event_ids)
        engine.dispose()
    out(report.summary())
    if not report.ok:
        out(f"process logs: {log_dir}")
    return report


class Traffic:
    """The valid transfers, sent in a thread: the planned ones paced over most of the run, then more in slices
    of a few seconds while the run is extended for owed faults (``extended`` set) and until ``finish``."""

    def __init__(self, bootstrap: str, topic: str, pool: list[dict[str, Any]], *, planned: int, rate: float,
                 seed: str) -> None:
        self.by_id = {t["transfer_id"]: t for t in pool}
        self.reports: list[Any] = []
        self.error: Exception | None = None
        self.extended = threading.Event()
        self._pool, self._planned, self._rate, self._seed = pool, planned, rate, seed
        self._bootstrap, self._topic = bootstrap, topic
        self._over = threading.Event()
        self._sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def sent(self) -> list[dict[str, Any]]:
        """The transfers handed to the producer (each acknowledged by the broker once ``finish`` returned True)."""
        return self._pool[:self._sent]

    def finish(self, timeout_s: float) -> bool:
        """No more slices; wait for the one being sent. False if the thread is still sending."""
        self._over.set()
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        end, step = self._planned, max(1, int(self._rate * 5))
        while self._sent < len(self._pool):
            if self._sent >= self._planned:
                # The planned traffic is out: more only while the run goes on for owed faults.
                while not (self._over.is_set() or self.extended.is_set()):
                    self._over.wait(0.5)
                if self._over.is_set():
                    return
                end = min(len(self._pool), self._sent + step)
            batch = self._pool[self._sent:end]
            self._sent = end  # before sending: a send that fails half-way may still have delivered some
            try:
                self.reports.append(send_transfers(self._bootstrap, self._topic, batch, resend=0.2,
                                                   seed=f"{self._seed}-{len(self.reports)}", rate=self._rate))
            except Exception as exc:  # reported by run_bank; the transfers not delivered then count as lost
                self.error = exc
                return


def _applied_runs(engine: sa.Engine) -> int | None:
    """Handler runs committed so far (journal rows), or ``None`` while the database is unreachable."""
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one())
    except sa.exc.DBAPIError:
        return None


def _wait_for_progress(engine: sa.Engine, before: int, started: float) -> float | None:
    """Seconds from ``started`` until more than ``before`` handler runs committed; ``None`` past the limit."""
    while time.monotonic() - started < RESUME_LIMIT_S:
        now = _applied_runs(engine)
        if now is not None and now > before:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _broker_fault(kind: str, cluster: KafkaCluster, topic: str, group: str, engine: sa.Engine,
                  rng: random.Random) -> float | None:
    """Inject one broker fault; return the seconds until a transfer was applied again."""
    before = _applied_runs(engine) or 0
    if kind == "cluster-restart":
        cluster.stop()  # SIGTERM: each broker shuts down cleanly and keeps its log
        time.sleep(rng.uniform(0.5, 2.0))
        for node in cluster.nodes:
            cluster.start_node(node.node_id)
        started = time.monotonic()
        cluster.wait_ready()
        return _wait_for_progress(engine, before, started)
    if kind == "leader-kill":
        node_id = Counter(cluster.leaders(topic).values()).most_common(1)[0][0]
    else:
        node_id = cluster.coordinator_of(group)
    started = time.monotonic()
    cluster.kill(node_id)
    # Transfers must resume on the two brokers left (min.insync.replicas=2);
    # the killed one comes back afterwards and catches up.
    seconds = _wait_for_progress(engine, before, started)
    cluster.start_node(node_id)
    cluster.wait_ready()
    return seconds


@dataclass(frozen=True)
class Scopes:
    """The dedup scopes of the transfer handler and the ledger handler."""

    transfer: str
    ledger: str


def _resume(pool: Processes, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None and proc.pid in pool.stopped:
        proc.send_signal(signal.SIGCONT)
    pool.stopped.discard(proc.pid)


def _caught_up(engine: sa.Engine, scopes: Scopes, transfers: int, bad: int) -> bool:
    """Every transfer recorded, every bad record dead-lettered, the outbox sent and every line written."""
    try:
        with engine.connect() as conn:
            def count(query: sa.Select[Any]) -> int:
                return int(conn.execute(query).scalar_one())

            return (
                count(sa.select(sa.func.count()).select_from(models.transfers)) >= transfers
                and count(sa.select(sa.func.count()).select_from(processed).where(
                    processed.c.scope == scopes.transfer, processed.c.outcome == "dead_lettered")) >= bad
                and count(sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))) == 0
                and count(sa.select(sa.func.count()).select_from(parked).where(parked.c.scope == scopes.ledger)) == 0
                and count(sa.select(sa.func.count()).select_from(ledger_models.statement_lines))
                >= 2 * count(sa.select(sa.func.count()).select_from(models.transfers)
                             .where(models.transfers.c.status == models.APPLIED))
            )
    except sa.exc.OperationalError:
        return False


def _check(report: Report, engine: sa.Engine, expected_ids: set[str], transfers: list[dict[str, Any]],
           bad_expected: dict[tuple[int, int], str], balances_before: dict[str, int],
           letters: list[dict[str, str]], topic: str) -> None:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models.transfers)).mappings().all()
        journal_counts = Counter(
            r[0] for r in conn.execute(sa.text("SELECT transfer_id FROM chaos_journal")))
        balances_after = dict(conn.execute(sa.select(models.accounts.c.id, models.accounts.c.balance)).all())
        dead_rows = conn.execute(sa.text(
            "SELECT topic, kafka_partition, kafka_offset FROM exactlyonce_processed "
            "WHERE outcome = 'dead_lettered'")).all()
        report.transfer_duplicates = int(conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(counters.c.duplicates), 0)).where(counters.c.topic == topic)
        ).scalar_one())
    recorded = {r["transfer_id"]: r for r in rows}
    report.applied_once = sum(1 for tid in expected_ids if journal_counts.get(tid) == 1)
    report.applied_twice = sum(1 for count in journal_counts.values() if count > 1)
    report.lost = len(expected_ids - recorded.keys())
    report.phantom = len(recorded.keys() - expected_ids)
    report.rejected = sum(1 for r in rows if r["status"] != models.APPLIED)
    by_id = {t["transfer_id"]: t for t in transfers}
    report.mismatch_applied_wrong_amount = sum(
        1 for tid, r in recorded.items() if tid in by_id and r["amount"] != by_id[tid]["amount"])

    # Dead letters: exactly the bad records, each with its reason.
    report.bad_sent = len(bad_expected)
    report.dead_letter_records = len(letters)
    seen: dict[tuple[int, int], str] = {}
    for letter in letters:
        if letter.get("x-exactlyonce-topic") == topic:
            seen[(int(letter["x-exactlyonce-partition"]), int(letter["x-exactlyonce-offset"]))] = \
                letter["x-exactlyonce-reason"]
    report.dead_lettered = len(seen)
    report.dead_letters_missing = len(bad_expected.keys() - seen.keys())
    report.dead_letters_unexpected = len(seen.keys() - bad_expected.keys())
    wrong_reason = sum(1 for c, reason in bad_expected.items() if c in seen and seen[c] != reason)
    db_dead = {(p, o) for t, p, o in dead_rows if t == topic}

    # Balances against the ledger recomputed from the applied transfers.
    expected_balances = dict(balances_before)
    for r in rows:
        if r["status"] == models.APPLIED:
            expected_balances[r["from_account"]] -= r["amount"]
            expected_balances[r["to_account"]] += r["amount"]
    report.money_after = sum(balances_after.values())
    report.balance_mismatches = sum(1 for a, b in expected_balances.items() if balances_after.get(a) != b)
    report.negative_balances = sum(1 for b in balances_after.values() if b < 0)

    checks = [
        (report.applied_twice == 0, f"{report.applied_twice} transfers applied twice"),
        (report.lost == 0, f"{report.lost} transfers lost"),
        (report.phantom == 0, f"{report.phantom} transfers nobody sent"),
        (report.applied_once == len(expected_ids), f"only {report.applied_once} applied once"),
        (report.mismatch_applied_wrong_amount == 0,
         f"{report.mismatch_applied_wrong_amount} transfers applied with a re-sent amount"),
        (report.dead_letters_missing == 0, f"{report.dead_letters_missing} bad records not dead-lettered"),
        (report.dead_letters_unexpected == 0, f"{report.dead_letters_unexpected} good records dead-lettered"),
        (wrong_reason == 0, f"{wrong_reason} dead letters with the wrong reason"),
        (db_dead == set(bad_expected), "dead-letter rows in the database differ from the bad records"),
        (report.money_after == report.money_before, "money not conserved"),
        (report.balance_mismatches == 0, f"{report.balance_mismatches} balances differ from the ledger"),
        (report.negative_balances == 0, f"{report.negative_balances} negative balances"),
        (all(code == 0 for codes in report.exit_codes.values() for code in codes),
         f"processes exited with {report.exit_codes} on SIGTERM"),
    ]
    report.problems.extend(message for ok, message in checks if not ok)


def _check_ledger(report: Report, engine: sa.Engine, balances_before: dict[str, int], scopes: Scopes,
                  event_ids: Counter[str]) -> None:
    """The example's ledger verification, plus the outbox, the topic and the ledger's own counts."""
    with engine.connect() as conn:
        outbox_ids = set(conn.execute(sa.select(outbox.c.message_id)).scalars())
        def count(query: sa.Select[Any]) -> int:
            return int(conn.execute(query).scalar_one())

        report.events = count(sa.select(sa.func.count()).select_from(outbox))
        report.outbox_pending = count(sa.select(sa.func.count()).select_from(outbox)
                                      .where(outbox.c.sent_at.is_(None)))
        report.ledger_streams = count(sa.select(sa.func.count()).select_from(sequence_streams)
                                      .where(sequence_streams.c.scope == scopes.ledger))
        report.ledger_parked_left = count(sa.select(sa.func.count()).select_from(parked)
                                          .where(parked.c.scope == scopes.ledger))
        report.ledger_dead_lettered = count(sa.select(sa.func.count()).select_from(processed).where(
            processed.c.scope == scopes.ledger, processed.c.outcome == "dead_lettered"))
        totals = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(counters.c.duplicates), 0),
                      sa.func.coalesce(sa.func.sum(counters.c.parked), 0))
            .where(counters.c.scope == scopes.ledger)).one()
    report.ledger_duplicates, report.ledger_parked = int(totals[0]), int(totals[1])
    # Every record on the topic that is not an outbox row's first copy: a
    # relay's re-send, or one of the test's stray copies.
    report.event_records = sum(event_ids.values())
    report.relay_resends = report.event_records - len(event_ids) - report.stray_copies
    unsent = len(outbox_ids - event_ids.keys())
    unknown = len(event_ids.keys() - outbox_ids)

    result = verify_ledger(engine, initial_balances=balances_before, scope=scopes.ledger)
    report.ledger_line = result.line
    report.ledger_lines = result.lines
    report.ledger_missing, report.ledger_doubled = result.missing, result.doubled
    report.ledger_misnumbered, report.ledger_balances_off = result.misnumbered, result.balances_off
    report.problems.extend(f"ledger: {problem}" for problem in result.problems[:MAX_LEDGER_PROBLEMS])
    if len(result.problems) > MAX_LEDGER_PROBLEMS:
        report.problems.append(f"ledger: ... and {len(result.problems) - MAX_LEDGER_PROBLEMS} more problems")
    checks = [
        (report.outbox_pending == 0, f"{report.outbox_pending} statement events never relayed"),
        (unsent == 0, f"{unsent} statement events missing from the topic"),
        (unknown == 0, f"{unknown} records on the topic that are no statement event"),
        (report.ledger_lines == report.events, f"{report.ledger_lines} statement lines for {report.events} events"),
    ]
    report.problems.extend(message for ok, message in checks if not ok)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.chaos.bank``: a soak with a chosen duration and seed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("CHAOS_DURATION", 600)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", 1)))
    parser.add_argument("--workers", type=int, default=3, help="transfer workers (default 3)")
    parser.add_argument("--relays", type=int, default=2, help="standalone outbox relays (default 2)")
    parser.add_argument("--ledger-workers", type=int, default=2, help="ledger workers (default 2)")
    parser.add_argument("--database-url", default=os.environ.get("EXACTLYONCE_TEST_POSTGRES_URL",
                                                                 DEFAULT_DATABASE_URL))
    parser.add_argument("--faults", default="kill,zombie,cut,db-restart",
                        help="comma-separated fault kinds to inject")
    parser.add_argument("--cluster", action="store_true",
                        help="run on a three-node Apache Kafka cluster started here, with broker faults "
                             f"({', '.join(BROKER_FAULTS)}) added to --faults")
    parser.add_argument("--async-handler", action="store_true",
                        help="the transfer workers run an async def handler (an AsyncSession on their event loop)")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = parser.parse_args(argv)
    faults = tuple(args.faults.split(","))
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.cluster:
            cluster = stack.enter_context(KafkaCluster(3))
            faults = tuple(f for f in faults if f != "cut") + BROKER_FAULTS
        report = run_bank(duration_s=args.duration, seed=args.seed, workers=args.workers, relays=args.relays,
                          ledger_workers=args.ledger_workers, database_url=args.database_url,
                          faults=faults, cluster=cluster, async_handler=args.async_handler)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
