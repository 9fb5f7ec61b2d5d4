"""Process, database and network faults: nothing lost, nothing applied twice.

Each test injects one fault against the real broker and database and then
checks every record's effect exists exactly once and the group's committed
offsets reach the end of the topic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from exactlyonce import Message, migrate
from exactlyonce.embedded import free_port
from tests.chaos.bank import can_restart_postgres
from tests.conftest import drop_all_tables, unavailable
from tests.faultproxy import FaultProxy
from tests.integration.helpers import (
    Proc,
    committed_and_end_offsets,
    create_effects,
    create_topic,
    effect_counts,
    effect_rows,
    engine_for,
    insert_effect,
    make_app,
    produce,
    rec,
    running,
    subprocess_env,
    total_effects,
    unique,
    wait_all_committed,
    wait_until,
)
from tests.services.brokers import private_broker

pytestmark = pytest.mark.service


@pytest.fixture
def pg(postgres_url: str) -> Iterator[str]:
    """A clean PostgreSQL database at head, with the effects table."""
    drop_all_tables(postgres_url)
    engine = engine_for(postgres_url)
    migrate.upgrade(engine)
    create_effects(engine)
    engine.dispose()
    yield postgres_url


def worker(tmp_path: Path, name: str, bootstrap: str, database_url: str, topic: str, group: str,
           *args: str) -> Proc:
    return Proc([sys.executable, "-m", "tests.faults.worker", topic, group, *args], tmp_path / f"{name}.log",
                subprocess_env(EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap, EXACTLYONCE_DATABASE_URL=database_url))


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    committed, _ = committed_and_end_offsets(bootstrap, group, topic)
    return sum(offset or 0 for offset in committed.values())



def assert_each_once(engine_url: str, ids: list[str]) -> None:
    counts = effect_counts(engine_for(engine_url))
    assert sorted(counts) == sorted(ids), "every record applied, none invented"
    assert {c for c in counts.values()} == {1}, f"applied twice: {[i for i, c in counts.items() if c > 1]}"


def _pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                   check=True, timeout=120, capture_output=True)


def test_database_outage_commits_nothing_and_resumes(bootstrap_servers: str, pg: str, tmp_path: Path) -> None:
    """While PostgreSQL is down no offset moves and nothing is dropped; the worker resumes by itself."""
    if not can_restart_postgres(pg):
        unavailable("needs this machine's PostgreSQL cluster (127.0.0.1:5432) to stop and start it")
    topic, group = unique("outage"), unique("g")
    create_topic(bootstrap_servers, topic)
    first = [f"a{i}" for i in range(20)]
    second = [f"b{i}" for i in range(20)]
    produce(bootstrap_servers, topic, [rec(i) for i in first])
    proc = worker(tmp_path, "w", bootstrap_servers, pg, topic, group)
    try:
        wait_until(lambda: committed_total(bootstrap_servers, group, topic) == 20, 60, "first records committed")
        try:
            _pg_ctl("stop")
            produce(bootstrap_servers, topic, [rec(i) for i in second])
            time.sleep(5)
            assert committed_total(bootstrap_servers, group, topic) == 20, "an offset moved while the DB was down"
            assert proc.popen.poll() is None, f"worker died during the outage:\n{proc.log_tail()}"
        finally:
            _pg_ctl("start")
        wait_until(lambda: committed_total(bootstrap_servers, group, topic) == 40, 120,
                   "records after the outage committed")
        assert proc.terminate() == 0
    finally:
        proc.close()
    assert_each_once(pg, first + second)


def test_broker_connection_cuts_mid_batch(pg: str) -> None:
    """Cutting every broker connection repeatedly while a batch is handled loses and doubles nothing."""
    broker_port, proxy_port = free_port(), free_port()
    with private_broker(broker_port, advertised_port=proxy_port) as bootstrap, \
            FaultProxy(broker_port, port=proxy_port) as proxy:
        topic = unique("cuts")
        create_topic(bootstrap, topic, partitions=3)
        ids = [f"m{i}" for i in range(300)]
        produce(bootstrap, topic, [rec(i, partition=n % 3) for n, i in enumerate(ids)])
        app = make_app(bootstrap, pg)

        @app.handler(topic)
        def handle(message: Message, session: Session) -> None:
            time.sleep(0.005)
            insert_effect(session, (message.header("message-id") or b"").decode())

        with running(app, join_timeout=60):
            wait_until(lambda: app.stats["applied"] >= 20, 60, "processing under way")
            for _ in range(5):
                proxy.cut()
                time.sleep(0.4)
            assert proxy.cuts == 5
            wait_all_committed(bootstrap, app.group_id, topic, timeout=120)
    assert_each_once(pg, ids)


def test_zombie_paused_past_session_timeout_rejoins_without_double_effects(
    bootstrap_servers: str, pg: str, tmp_path: Path
) -> None:
    """A worker SIGSTOPped past its session timeout loses its partitions, resumes, rejoins; nothing doubles.

    Its partitions move while it sleeps; when it wakes, the group's
    generation fencing must refuse its stale offset commits, so no committed
    offset ever moves backwards over the new owner's (watched throughout).
    """
    topic, group = unique("zombie"), unique("g")
    create_topic(bootstrap_servers, topic, partitions=4)
    a = worker(tmp_path, "a", bootstrap_servers, pg, topic, group, "--sleep", "0.02")
    b = worker(tmp_path, "b", bootstrap_servers, pg, topic, group, "--sleep", "0.02")
    watcher = CommitWatcher(bootstrap_servers, group, topic)
    try:
        wait_until(lambda: "assigned partitions: " + topic in a.log_tail(100_000)
                   and "assigned partitions: " + topic in b.log_tail(100_000), 60, "both workers assigned")
        ids = [f"m{i}" for i in range(200)]
        produce(bootstrap_servers, topic, [rec(i, partition=n % 4) for n, i in enumerate(ids)])
        wait_until(lambda: total_effects(engine_for(pg)) >= 20, 60, "processing under way")
        assignments_before = a.log_tail(1_000_000).count("assigned partitions")
        a.popen.send_signal(signal.SIGSTOP)
        time.sleep(6 + 3)  # the session timeout is 6 s
        a.popen.send_signal(signal.SIGCONT)
        wait_all_committed(bootstrap_servers, group, topic, timeout=120)
        wait_until(lambda: a.log_tail(1_000_000).count("assigned partitions") > assignments_before, 60,
                   "the zombie rejoined")
        later = [f"n{i}" for i in range(100)]
        produce(bootstrap_servers, topic, [rec(i, partition=n % 4) for n, i in enumerate(later)])
        wait_all_committed(bootstrap_servers, group, topic, timeout=120)
        workers_of_later = {r.worker for r in effect_rows(engine_for(pg)) if r.message_id.startswith("n")}
        assert str(a.popen.pid) in workers_of_later, "the resumed worker takes part again"
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        watcher.stop()
        a.close()
        b.close()
    assert_each_once(pg, ids + later)
    assert watcher.samples > 10, "the committed offsets were watched"
    assert not watcher.regressions, f"committed offsets moved backwards: {watcher.regressions}"


class CommitWatcher:
    """Reads ``group``'s committed offsets of ``topic`` every 100 ms and notes any that moved backwards."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.regressions: list[tuple[int, int, int]] = []
        self.samples = 0
        self._args = (bootstrap, group, topic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        highest: dict[int, int] = {}
        while not self._stop.wait(0.1):
            try:
                committed, _ = committed_and_end_offsets(*self._args)
            except Exception:  # a broker hiccup; the next sample will do
                continue
            self.samples += 1
            for partition, offset in committed.items():
                if offset is None:
                    continue
                if offset < highest.get(partition, -1):
                    self.regressions.append((partition, highest[partition], offset))
                highest[partition] = max(offset, highest.get(partition, -1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_handler_slower_than_max_poll_interval_applies_once(
    bootstrap_servers: str, pg: str, tmp_path: Path
) -> None:
    """A handler outliving max_poll_interval_ms gets its member evicted; the records still apply once."""
    topic, group = unique("slow"), unique("g")
    create_topic(bootstrap_servers, topic, partitions=2)
    # The steady worker joins first and stays the group leader. (The embedded
    # broker livelocks a group whose leader left during a rebalance; real
    # Kafka elects a new leader.)
    steady = worker(tmp_path, "steady", bootstrap_servers, pg, topic, group)
    slow = None
    ids = [f"m{i}" for i in range(20)]
    try:
        wait_until(lambda: f"assigned partitions: {topic}" in steady.log_tail(100_000), 60, "steady worker assigned")
        slow = worker(tmp_path, "slow", bootstrap_servers, pg, topic, group, "--sleep-first", "9",
                      "--consumer-config", '{"max_poll_interval_ms": 4000}')
        wait_until(lambda: f"assigned partitions: {topic}[" in slow.log_tail(100_000), 60, "slow worker assigned")
        produce(bootstrap_servers, topic, [rec(i, partition=n % 2) for n, i in enumerate(ids)])
        wait_all_committed(bootstrap_servers, group, topic, timeout=120)
        log = slow.log_tail(1_000_000)
        assert "first record: sleeping" in log and "poll timeout has expired" in log, "the slow member was evicted"
        assert steady.terminate() == 0 and slow.terminate() == 0
    finally:
        steady.close()
        if slow is not None:
            slow.close()
    assert_each_once(pg, ids)


def test_sigterm_during_a_busy_batch_commits_what_is_done_and_exits_zero(
    bootstrap_servers: str, pg: str, tmp_path: Path
) -> None:
    """SIGTERM mid-batch: exit 0 within seconds, with the committed offset equal to the records applied."""
    topic, group = unique("term"), unique("g")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [rec(f"m{i}") for i in range(200)])
    # Batches of 10 records of 0.1 s each: SIGTERM lands inside a batch.
    proc = worker(tmp_path, "w", bootstrap_servers, pg, topic, group, "--sleep", "0.1", "--batch-size", "10")
    try:
        wait_until(lambda: total_effects(engine_for(pg)) >= 10, 60, "busy")
        started = time.monotonic()
        assert proc.terminate(timeout=15) == 0, proc.log_tail()
        took = time.monotonic() - started
    finally:
        proc.close()
    applied = total_effects(engine_for(pg))
    assert 10 <= applied < 200, "stopped mid-batch"
    assert committed_total(bootstrap_servers, group, topic) == applied, "committed exactly what was applied"
    assert took < 15
