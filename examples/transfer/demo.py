"""End-to-end demo: transfers applied exactly once through re-sends and a crash.

``python -m examples.transfer.demo`` (or ``make demo``):

1. starts an embedded Kafka-protocol broker, unless
   ``EXACTLYONCE_BOOTSTRAP_SERVERS`` names a Kafka cluster, and uses a fresh
   SQLite file in ``.demo/``, unless ``EXACTLYONCE_DATABASE_URL`` names a
   database;
2. upgrades exactlyonce's tables, (re)creates the example's tables and seeds
   the accounts, creates the topic with 3 partitions;
3. starts two workers (``exactlyonce run examples.transfer.service:app``, in
   subprocesses logging to ``.demo/worker-N.log``) and produces transfers, a
   share of them twice, some copies onto another partition;
4. SIGKILLs a worker mid-run, as a crash would, and starts a replacement;
5. waits until every transfer is recorded and every record consumed, stops
   the workers with SIGTERM (each must exit 0), and verifies the database
   (:mod:`examples.transfer.verify`). The distinct transfers sent are saved
   to ``.demo/sent.json``.

It exits 0 only if the verification passes. With an external Kafka cluster the
topic and consumer group get a unique suffix, so every run starts clean; on an
external database the example's tables are dropped and recreated.
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
from exactlyonce.schema import processed
from examples.transfer import models, producer, verify

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / ".demo"

#: Notice a killed worker after 6 s instead of exactlyonce's default 10 s.
DEMO_CONSUMER_CONFIG = '{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}'

PARTITIONS = 3
ACCOUNTS = 100
BALANCE = 10_000


def say(text: str) -> None:
    """Print one line of the demo's narration."""
    print(f"demo: {text}", flush=True)


@dataclass
class Worker:
    """One ``exactlyonce run`` subprocess."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    @classmethod
    def start(cls, name: str, env: dict[str, str]) -> Worker:
        log_path = DEMO_DIR / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "exactlyonce", "run", "examples.transfer.service:app"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return cls(name, log_path, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

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

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
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


class Producer(threading.Thread):
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


@contextlib.contextmanager
def kafka_cluster(run_id: str) -> Iterator[tuple[str, str, str]]:
    """Yield ``(bootstrap servers, topic, group)``: the embedded broker unless one is configured."""
    bootstrap = os.environ.get(BOOTSTRAP_SERVERS_ENV)
    if bootstrap:
        say(f"kafka: {bootstrap} (topic and group suffixed with {run_id})")
        yield bootstrap, f"transfers-demo-{run_id}", f"transfer-service-demo-{run_id}"
        return
    with EmbeddedBroker() as broker:
        say(f"kafka: embedded broker (tansu, memory only) at {broker.bootstrap_servers}")
        yield broker.bootstrap_servers, "transfers", "transfer-service"


def database_url() -> str:
    """``EXACTLYONCE_DATABASE_URL``, else a fresh SQLite file in ``.demo/``."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    path = DEMO_DIR / "transfer.db"
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return f"sqlite:///{path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit 0 only if every transfer was applied exactly once."""
    parser = argparse.ArgumentParser(prog="python -m examples.transfer.demo",
                                     description="Transfers applied exactly once, through "
                                                 "re-sends and a killed worker.")
    parser.add_argument("--count", type=int, default=2000, help="distinct transfers (default 2000)")
    parser.add_argument("--resend", type=float, default=0.2, help="share re-sent (default 0.2)")
    parser.add_argument("--rate", type=float, default=400.0,
                        help="transfers produced per second (default 400)")
    parser.add_argument("--kill-at", type=float, default=0.3,
                        help="kill a worker once this share of transfers is recorded (default 0.3)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for all transfers (default 120)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    DEMO_DIR.mkdir(exist_ok=True)
    run_id = secrets.token_hex(3)
    workers: list[Worker] = []
    ok = False
    try:
        with kafka_cluster(run_id) as (bootstrap, topic, group):
            ok = _run(args, run_id, bootstrap, topic, group, workers)
    finally:
        for worker in workers:
            if worker.alive():
                worker.stop(timeout_s=10)
    elapsed = time.monotonic() - started
    say(f"finished in {elapsed:.1f} s" if ok else f"FAILED after {elapsed:.1f} s")
    return 0 if ok else 1


def _run(args: argparse.Namespace, run_id: str, bootstrap: str, topic: str, group: str,
         workers: list[Worker]) -> bool:
    url = database_url()
    # The service reads these when it is imported, here and in the workers.
    os.environ["EXACTLYONCE_TRANSFER_TOPIC"] = topic
    os.environ["EXACTLYONCE_TRANSFER_GROUP"] = group
    from examples.transfer.service import CONSUMER_CONFIG_ENV, app

    scope = app.handlers[topic].scope
    engine = models.create_engine(url)
    try:
        say(f"database: {engine.url.render_as_string(hide_password=True)}")
        migrate.upgrade(engine)  # what `exactlyonce db upgrade` does
        models.drop_schema(engine)
        models.create_schema(engine)
        with engine.begin() as connection:
            connection.execute(sa.delete(processed).where(processed.c.scope == scope))
        initial = models.seed_accounts(engine, ACCOUNTS, BALANCE)
        producer.ensure_topic(bootstrap, topic, PARTITIONS)
        say(f"seeded {ACCOUNTS} accounts x {BALANCE} cents; topic {topic!r} has {PARTITIONS} "
            f"partitions; dedup scope {scope!r}")

        env = {
            **os.environ,
            BOOTSTRAP_SERVERS_ENV: bootstrap,
            DATABASE_URL_ENV: url,
            CONSUMER_CONFIG_ENV: os.environ.get(CONSUMER_CONFIG_ENV) or DEMO_CONSUMER_CONFIG,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        workers += [Worker.start("worker-1", env), Worker.start("worker-2", env)]
        say(f"started worker-1 (pid {workers[0].process.pid}) and worker-2 "
            f"(pid {workers[1].process.pid})")

        transfers = producer.make_transfers(args.count, ACCOUNTS, seed=run_id)
        ids = [transfer["transfer_id"] for transfer in transfers]
        sender = Producer(bootstrap, topic, transfers, args.resend, run_id, args.rate)
        sender.start()
        say(f"producing {len(transfers)} transfers at {args.rate:.0f}/s, "
            f"~{args.resend:.0%} of them twice")

        if not _wait_and_crash(args, engine, bootstrap, topic, group, ids, sender, env, workers):
            _show_logs(workers)
            return False

        say("every transfer recorded and every record consumed; stopping workers (SIGTERM)")
        clean = True
        for worker in workers:
            if worker.process.returncode is not None:
                continue  # the killed one
            code = worker.stop()
            say(f"{worker.name} exited {code}: {worker.stats()}")
            clean = clean and code == 0

        assert sender.report is not None
        sender.report.save(DEMO_DIR / "sent.json")
        result = verify.verify(engine, sender.report.transfers, scope=scope,
                               initial_balances=initial, records=sender.report.records)
        verify.report(result)
        if not clean:
            say("a worker did not exit cleanly")
            _show_logs(workers)
        return result.ok and clean
    finally:
        engine.dispose()


def _wait_and_crash(args: argparse.Namespace, engine: sa.Engine, bootstrap: str, topic: str,
                    group: str, ids: list[str], sender: Producer, env: dict[str, str],
                    workers: list[Worker]) -> bool:
    """Kill worker-1 mid-run, start a replacement, wait for the end. False on failure."""
    deadline = time.monotonic() + args.timeout
    kill_at = int(len(ids) * args.kill_at)
    killed = False
    admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        while True:
            if sender.error is not None:
                say(f"producer failed: {sender.error!r}")
                return False
            for worker in workers:
                if worker.process.returncode is None and not worker.alive():
                    say(f"{worker.name} exited unexpectedly with {worker.process.returncode}")
                    return False
            done = verify.recorded_count(engine, ids)
            if not killed and done >= kill_at and workers[0].assigned():
                workers[0].kill()
                killed = True
                say(f"SIGKILLed worker-1 with {done}/{len(ids)} transfers recorded; "
                    f"its uncommitted records will be redelivered")
                workers.append(Worker.start("worker-3", env))
                say(f"started worker-3 (pid {workers[-1].process.pid}) as its replacement")
            if (
                done == len(ids)
                and sender.report is not None
                and consumed_everything(admin, topic, group, sender.report.end_offsets)
            ):
                if not killed:
                    say("warning: all transfers were done before a worker could be killed")
                return True
            if time.monotonic() >= deadline:
                say(f"timed out after {args.timeout:.0f} s with {done}/{len(ids)} transfers recorded")
                return False
            time.sleep(0.25)
    finally:
        admin.close()


def _show_logs(workers: list[Worker]) -> None:
    for worker in workers:
        say(f"{worker.name} log: {worker.log_path}")


if __name__ == "__main__":
    sys.exit(main())
