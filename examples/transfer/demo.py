"""End-to-end demo: transfers applied exactly once, statements built in order, through re-sends and crashes.

``python -m examples.transfer.demo`` (or ``make demo``):

1. starts an embedded Kafka-protocol broker, unless
   ``EXACTLYONCE_BOOTSTRAP_SERVERS`` names a Kafka cluster, and uses a fresh
   SQLite file in ``.demo/``, unless ``EXACTLYONCE_DATABASE_URL`` names a
   database;
2. upgrades exactlyonce's tables, (re)creates the examples' tables and seeds
   the accounts, creates the topics ``transfers`` and ``transfer-applied``
   with 3 partitions each;
3. starts two transfer workers (``exactlyonce run examples.transfer.service:app``,
   each also relaying the outbox to ``transfer-applied``) and two ledger
   workers (``exactlyonce run examples.ledger.service:app``), in subprocesses
   logging to ``.demo/<name>.log`` (``--workdir``), and produces transfers, a share of them
   twice, some copies onto another partition;
4. SIGKILLs a transfer worker mid-run, as a crash would, and starts a
   replacement; later SIGKILLs a ledger worker and replaces it too;
5. waits until every transfer is recorded and every record consumed, the
   outbox is empty and the ledger holds two lines per applied transfer, stops
   the workers with SIGTERM (each must exit 0), and verifies both services'
   tables (:mod:`examples.transfer.verify`, :mod:`examples.ledger.verify`).
   The distinct transfers sent are saved to ``.demo/sent.json``.

It exits 0 only if both verifications pass. With an external Kafka cluster the
topics and consumer groups get a unique suffix, so every run starts clean; on
an external database the examples' tables are dropped and recreated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import kafka
import sqlalchemy as sa
from kafka.structs import TopicPartition

from exactlyonce import EmbeddedBroker, migrate
from exactlyonce.app import BOOTSTRAP_SERVERS_ENV, DATABASE_URL_ENV
from exactlyonce.schema import outbox, parked, processed, sequence_streams
from examples.ledger import models as ledger_models
from examples.ledger import verify as ledger_verify
from examples.transfer import models, producer, verify

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / ".demo"

#: Notice a killed worker after 6 s instead of exactlyonce's default 10 s.
DEMO_CONSUMER_CONFIG = '{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}'

TRANSFER_APP = "examples.transfer.service:app"
LEDGER_APP = "examples.ledger.service:app"

PARTITIONS = 3
ACCOUNTS = 100
BALANCE = 10_000


def say(text: str) -> None:
    """Print one line of the demo's narration."""
    print(f"demo: {text}", flush=True)


@dataclass(frozen=True)
class Names:
    """The demo's topics and consumer groups."""

    transfers: str = "transfers"
    transfer_group: str = "transfer-service"
    applied: str = "transfer-applied"
    ledger_group: str = "ledger-service"

    @classmethod
    def suffixed(cls, run_id: str) -> Names:
        """Names no earlier run used, for a Kafka cluster that outlives the demo."""
        return cls(*(f"{name}-demo-{run_id}" for name in (
            cls.transfers, cls.transfer_group, cls.applied, cls.ledger_group)))


@dataclass
class Worker:
    """One ``exactlyonce run`` subprocess."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)
    terminating: bool = False

    @classmethod
    def start(cls, name: str, app: str, env: dict[str, str], log_dir: Path) -> Worker:
        log_path = log_dir / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "exactlyonce", "run", app],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return cls(name, log_path, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def killed(self) -> bool:
        return self.process.returncode == -signal.SIGKILL

    def joined(self) -> bool:
        """Whether the worker has joined its group (and so handles SIGTERM): it logged an assignment."""
        return "assigned partitions: " in self._read_log()

    def assigned(self) -> bool:
        """Whether the worker's latest assignment holds partitions."""
        found = re.findall(r"assigned partitions: (.*)", self._read_log())
        return bool(found) and found[-1].strip() != "none"

    def stats(self) -> str:
        """The ``stopped: {...}`` counts the worker logs when it exits."""
        found = re.findall(r"stopped: (\{.*\})", self._read_log())
        if not found:
            return "no stats logged"
        return "no records left for it" if found[-1] == "{}" else found[-1]

    def kill(self) -> None:
        """SIGKILL: no chance to finish the record in hand or commit offsets."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def terminate(self) -> None:
        """SIGTERM: finish the record in hand, commit, leave the group, exit 0."""
        if self.alive() and not self.terminating:
            self.process.send_signal(signal.SIGTERM)
            self.terminating = True

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        self.terminate()
        if self.alive():
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout_s:.0f} s; killing it")
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def _read_log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Sender(threading.Thread):
    """Runs :func:`producer.send_transfers` in the background."""

    def __init__(self, bootstrap: str, topic: str, transfers: list[dict[str, Any]],
                 resend: float, seed: str, rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        self._servers, self._topic, self._transfers = bootstrap, topic, transfers
        self._resend, self._seed, self._rate = resend, seed, rate
        self.report: producer.SendReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.report = producer.send_transfers(
                self._servers, self._topic, self._transfers,
                resend=self._resend, seed=self._seed, rate=self._rate,
            )
        except BaseException as exc:
            self.error = exc


def consumed_everything(admin: kafka.KafkaAdminClient, topic: str, group: str,
                        end_offsets: dict[int, int]) -> bool:
    """Whether the group has committed every partition up to ``end_offsets``."""
    committed = admin.list_group_offsets({group: None}).get(group, {})
    for partition, end in end_offsets.items():
        offset = committed.get(TopicPartition(topic, partition))
        if (offset.offset if offset is not None else 0) < end:
            return False
    return True


def pending_events(engine: sa.Engine, topic: str) -> int:
    """Outbox rows for ``topic`` that no relay has sent yet."""
    with engine.connect() as connection:
        return connection.execute(
            sa.select(sa.func.count()).select_from(outbox)
            .where(outbox.c.topic == topic, outbox.c.sent_at.is_(None))
        ).scalar_one()


@contextlib.contextmanager
def kafka_cluster(run_id: str) -> Iterator[tuple[str, Names]]:
    """Yield the bootstrap servers and the names to use: the embedded broker unless one is configured."""
    bootstrap = os.environ.get(BOOTSTRAP_SERVERS_ENV)
    if bootstrap:
        say(f"kafka: {bootstrap} (topics and groups suffixed with {run_id})")
        yield bootstrap, Names.suffixed(run_id)
        return
    with EmbeddedBroker() as broker:
        say(f"kafka: embedded broker (tansu, memory only) at {broker.bootstrap_servers}")
        yield broker.bootstrap_servers, Names()


def database_url(workdir: Path) -> str:
    """``EXACTLYONCE_DATABASE_URL``, else a fresh SQLite file in ``workdir``."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    path = workdir / "transfer.db"
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return f"sqlite:///{path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit 0 only if both services' tables verify."""
    parser = argparse.ArgumentParser(prog="python -m examples.transfer.demo",
                                     description="Transfers applied exactly once and statements "
                                                 "built in order, through re-sends and killed workers.")
    parser.add_argument("--count", type=int, default=2000, help="distinct transfers (default 2000)")
    parser.add_argument("--resend", type=float, default=0.2, help="share re-sent (default 0.2)")
    parser.add_argument("--rate", type=float, default=400.0,
                        help="transfers produced per second (default 400)")
    parser.add_argument("--kill-at", type=float, default=0.3,
                        help="kill a transfer worker once this share of transfers is recorded "
                             "(default 0.3)")
    parser.add_argument("--kill-ledger-at", type=float, default=0.3,
                        help="kill a ledger worker once the ledger holds this share of two lines per "
                             "transfer sent (default 0.3; rejected transfers get none)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for all transfers and statement lines (default 120)")
    parser.add_argument("--workdir", type=Path, default=DEMO_DIR,
                        help="for the worker logs, sent.json and the SQLite file (default .demo/)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(3)
    workers: list[Worker] = []
    ok = False
    try:
        with kafka_cluster(run_id) as (bootstrap, names):
            ok = _run(args, run_id, bootstrap, names, workers)
    finally:
        for worker in workers:
            if worker.alive():
                worker.stop(timeout_s=10)
    elapsed = time.monotonic() - started
    say(f"finished in {elapsed:.1f} s" if ok else f"FAILED after {elapsed:.1f} s")
    return 0 if ok else 1


def _run(args: argparse.Namespace, run_id: str, bootstrap: str, names: Names, workers: list[Worker]) -> bool:
    url = database_url(args.workdir)
    # The services read these when they are imported, here and in the workers.
    os.environ["EXACTLYONCE_TRANSFER_TOPIC"] = names.transfers
    os.environ["EXACTLYONCE_TRANSFER_GROUP"] = names.transfer_group
    os.environ["EXACTLYONCE_TRANSFER_APPLIED_TOPIC"] = names.applied
    os.environ["EXACTLYONCE_LEDGER_GROUP"] = names.ledger_group
    from examples.ledger import service as ledger_service
    from examples.transfer import service as transfer_service

    scope = transfer_service.app.handlers[names.transfers].scope
    ledger_scope = ledger_service.app.handlers[names.applied].scope
    engine = models.create_engine(url)
    try:
        say(f"database: {engine.url.render_as_string(hide_password=True)}")
        migrate.upgrade(engine)  # what `exactlyonce db upgrade` does
        ledger_models.drop_schema(engine)
        models.drop_schema(engine)
        models.create_schema(engine)
        ledger_models.create_schema(engine)
        with engine.begin() as connection:
            # exactlyonce's memory of earlier runs on an external database.
            connection.execute(sa.delete(processed).where(processed.c.scope.in_([scope, ledger_scope])))
            connection.execute(sa.delete(sequence_streams).where(sequence_streams.c.scope == ledger_scope))
            connection.execute(sa.delete(parked).where(parked.c.scope == ledger_scope))
            connection.execute(sa.delete(outbox).where(outbox.c.topic == names.applied))
        initial = models.seed_accounts(engine, ACCOUNTS, BALANCE)
        producer.ensure_topic(bootstrap, names.transfers, PARTITIONS)
        producer.ensure_topic(bootstrap, names.applied, PARTITIONS)
        say(f"seeded {ACCOUNTS} accounts x {BALANCE} cents; topics {names.transfers!r} and "
            f"{names.applied!r} have {PARTITIONS} partitions each")

        env = {
            **os.environ,
            BOOTSTRAP_SERVERS_ENV: bootstrap,
            DATABASE_URL_ENV: url,
            transfer_service.CONSUMER_CONFIG_ENV:
                os.environ.get(transfer_service.CONSUMER_CONFIG_ENV) or DEMO_CONSUMER_CONFIG,
            ledger_service.CONSUMER_CONFIG_ENV:
                os.environ.get(ledger_service.CONSUMER_CONFIG_ENV) or DEMO_CONSUMER_CONFIG,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        workers += [Worker.start(name, app, env, args.workdir) for name, app in (
            ("transfer-1", TRANSFER_APP), ("transfer-2", TRANSFER_APP),
            ("ledger-1", LEDGER_APP), ("ledger-2", LEDGER_APP))]
        say("started " + ", ".join(f"{w.name} (pid {w.process.pid})" for w in workers)
            + "; the transfer workers also relay the outbox")

        # Produce once every worker is in its group, so the kills land mid-run.
        deadline = time.monotonic() + args.timeout
        while not all(worker.joined() for worker in workers):
            if time.monotonic() >= deadline or not all(worker.alive() for worker in workers):
                say("the workers did not all join their groups")
                _show_logs(workers)
                return False
            time.sleep(0.1)
        say("every worker has joined its consumer group")

        transfers = producer.make_transfers(args.count, ACCOUNTS, seed=run_id)
        ids = [transfer["transfer_id"] for transfer in transfers]
        sender = Sender(bootstrap, names.transfers, transfers, args.resend, run_id, args.rate)
        sender.start()
        say(f"producing {len(transfers)} transfers at {args.rate:.0f}/s, "
            f"~{args.resend:.0%} of them twice")

        reader = models.create_reader(url)
        try:
            if not _wait_and_crash(args, reader, bootstrap, names, ids, sender, env, workers):
                _show_logs(workers)
                return False
        finally:
            reader.dispose()

        say("every transfer recorded and consumed, every event relayed and in the ledger; "
            "stopping workers (SIGTERM)")
        clean = True
        stopping = [worker for worker in workers if not worker.killed()]
        for worker in stopping:  # all at once: they leave their groups in parallel
            worker.terminate()
        for worker in stopping:
            code = worker.stop()
            say(f"{worker.name} exited {code}: {worker.stats()}")
            clean = clean and code == 0

        assert sender.report is not None
        sender.report.save(args.workdir / "sent.json")
        result = verify.verify(engine, sender.report.transfers, scope=scope,
                               initial_balances=initial, records=sender.report.records)
        ledger_result = ledger_verify.verify_ledger(engine, initial_balances=initial, scope=ledger_scope)
        verify.report(result)
        ledger_verify.report(ledger_result)
        if not clean:
            say("a worker did not exit cleanly")
            _show_logs(workers)
        return result.ok and ledger_result.ok and clean
    finally:
        engine.dispose()


def _wait_and_crash(args: argparse.Namespace, engine: sa.Engine, bootstrap: str, names: Names,
                    ids: list[str], sender: Sender, env: dict[str, str], workers: list[Worker]) -> bool:
    """Kill a transfer worker and a ledger worker mid-run, replace them, wait for the end.

    False on failure. The end: every transfer recorded, the transfer group's
    offsets committed to the end of its topic (so every re-sent copy was
    consumed too), no event left in the outbox, two statement lines per
    applied transfer, and every replacement in its group (a worker stopped
    before it has set up its signal handlers would not exit cleanly).
    """
    deadline = time.monotonic() + args.timeout
    # Who is killed, when its service's progress reaches what, and who replaces it.
    victims = {"transfer-1": ("transfers", int(len(ids) * args.kill_at), "transfer-3", TRANSFER_APP),
               "ledger-1": ("lines", int(2 * len(ids) * args.kill_ledger_at), "ledger-3", LEDGER_APP)}
    end_offsets: dict[int, int] | None = None
    admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        while True:
            if sender.error is not None:
                say(f"producer failed: {sender.error!r}")
                return False
            for worker in workers:
                if not worker.killed() and worker.process.poll() is not None:
                    say(f"{worker.name} exited unexpectedly with {worker.process.returncode}")
                    return False
            done = verify.recorded_count(engine, ids)
            progress = {"transfers": done, "lines": ledger_verify.line_count(engine)}
            for worker in list(workers):
                if worker.name not in victims or not worker.alive():
                    continue
                measure, kill_at, replacement, app = victims[worker.name]
                if progress[measure] >= kill_at and worker.assigned():
                    worker.kill()
                    say(f"SIGKILLed {worker.name} with {done}/{len(ids)} transfers recorded and "
                        f"{progress['lines']} statement lines written; its uncommitted records will be "
                        f"redelivered")
                    workers.append(Worker.start(replacement, app, env, args.workdir))
                    say(f"started {replacement} (pid {workers[-1].process.pid}) as its replacement")
            if end_offsets is None and sender.report is not None:
                end_offsets = producer.end_offsets(bootstrap, names.transfers, sender.report.records)
            if (
                done == len(ids)
                and end_offsets is not None
                and consumed_everything(admin, names.transfers, names.transfer_group, end_offsets)
                and pending_events(engine, names.applied) == 0
                and ledger_verify.line_count(engine) == 2 * ledger_verify.applied_count(engine)
                and all(worker.joined() for worker in workers if worker.alive())
            ):
                if sum(worker.killed() for worker in workers) < len(victims):
                    say("warning: everything was done before both workers could be killed")
                return True
            if time.monotonic() >= deadline:
                say(f"timed out after {args.timeout:.0f} s with {done}/{len(ids)} transfers recorded, "
                    f"{pending_events(engine, names.applied)} events in the outbox and "
                    f"{ledger_verify.line_count(engine)} statement lines for "
                    f"{ledger_verify.applied_count(engine)} applied transfers")
                return False
            time.sleep(0.25)
    finally:
        admin.close()


def _show_logs(workers: list[Worker]) -> None:
    for worker in workers:
        say(f"{worker.name} log: {worker.log_path}")


if __name__ == "__main__":
    sys.exit(main())
