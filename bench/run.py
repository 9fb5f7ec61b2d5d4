"""Benchmark exactlyonce against a raw consumer and a hand-written loop.

``python -m bench.run`` (``make bench``) measures, in one run on one topic:

- (a) a raw kafka-python consumer JSON-decoding every record, no database;
  (a-nocrc) the same with ``crc32c`` blocked; (a-c) a raw confluent-kafka consumer;
- (b) a hand-written loop: one transaction per record (dedup INSERT ... ON
  CONFLICT DO NOTHING + the transfer), offsets committed per poll; (b100) the
  same loop, 100 records a transaction;
- (c) exactlyonce, ordinary handler (the example's ``apply_transfer``), defaults;
  (c-sql) its statements alone, 100 records a transaction, from records read
  beforehand (no Kafka while timed, no exactlyonce);
- (d) exactlyonce, batch handler, defaults, set-based statements; (d100) with
  ``batch_size=100``; (d0) the handler writing nothing; (d-sql) the same
  statements alone, 500 records a transaction, from records read beforehand
  (no Kafka while timed, no exactlyonce); (d-c) on
  ``kafka_client="confluent"``; (d-nocrc) with ``crc32c`` blocked;

on PostgreSQL and SQLite (msgs/s, peak RSS, p50/p99 end-to-end latency; each
variant self-checks its result), then (p) a py-spy profile of (d) by stage,
(f) throughput against batch size, (e) scaling over 1..4 worker processes
(with a hot-row case, its lock waits bounded as by default and not), (h) RSS
over a long run and (g) claim latency against dedup-table size (uuid4 and
UUIDv7 IDs). The broker is Apache Kafka when it can start (else the embedded
one; ``--broker``). It prints a Markdown report
(a Targets table first) and writes ``bench/results.md`` and
``bench/throughput_vs_batch_size.png``. ``--quick`` is a smoke run (~2 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from bench import claims, common, profiling, report
from bench.common import ROOT
from bench.proc import EVENT_PREFIX, NO_CRC32C_ENV
from bench.windows import commit_gaps, min_window_rate, window_s
from exactlyonce import _db

BENCH_DIR = ROOT / "bench"
#: The hot-unbounded case's batch_lock_timeout: the App's default lock_timeout
#: (a tenth of kafka-python's max_poll_interval_ms), i.e. no shorter bound, so
#: that a deadlock waits for PostgreSQL's own check (the behaviour before
#: batch_lock_timeout).
UNBOUNDED_LOCK_WAIT_S = 30.0


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


class BenchError(Exception):
    """A variant failed (its worker died, reported an error or timed out)."""


class NotAvailable(Exception):
    """A variant cannot run here (its worker said why: an optional client missing, an option refused)."""


# -- worker processes ---------------------------------------------------------


class Child:
    """A ``python -m bench.worker`` process and the events it reports."""

    def __init__(self, spec: dict[str, Any], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {})},
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(EVENT_PREFIX):
                self._events.put(json.loads(line[len(EVENT_PREFIX):]))
        self._events.put({"event": "exit"})

    def wait(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for event ``name``; raise BenchError on an error, an exit or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {name!r}; see {self.log_path}")
            try:
                ev = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if ev["event"] == name:
                return ev
            if ev["event"] == "error":
                raise BenchError(f"{ev['message']} (see {self.log_path})")
            if ev["event"] == "unavailable":
                raise NotAvailable(ev["reason"])
            if ev["event"] == "exit":
                raise BenchError(f"worker exited with {self.proc.wait()} before {name!r}; see {self.log_path}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the exit (kill after ``timeout``)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()


# -- the run ------------------------------------------------------------------


class Bench:
    """Everything one ``python -m bench.run`` shares: broker, databases, topics, results."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, workdir: Path) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.run_id = secrets.token_hex(3)
        self.serial = 0
        self.pg_url = common.postgres_url(args.postgres_url) if not args.skip_postgres else None
        self.sqlite: common.SqliteFiles | None = None
        self.results: dict[str, Any] = {"variants": [], "errors": [], "notes": []}
        self.broker = "?"

    def spec(self, **fields: Any) -> dict[str, Any]:
        """A worker spec with what every worker shares."""
        heartbeat = max(100, min(1000, self.args.session_timeout_ms // 3))
        return {"bootstrap": self.bootstrap, "consumer_config": {
            "session_timeout_ms": self.args.session_timeout_ms, "heartbeat_interval_ms": heartbeat},
            # The same settings in librdkafka's keys, for the confluent-kafka variants.
            "confluent_config": {"session.timeout.ms": self.args.session_timeout_ms,
                                 "heartbeat.interval.ms": heartbeat, "fetch.wait.max.ms": 10},
            "accounts": self.args.accounts, **fields}

    def name(self, what: str) -> str:
        self.serial += 1
        return f"bench-{self.run_id}-{self.serial:02d}-{what}"

    # -- databases --

    def databases(self) -> list[str]:
        dbs = []
        if self.pg_url:
            dbs.append("postgresql")
        if not self.args.skip_sqlite:
            dbs.append("sqlite")
        return dbs

    def prepare(self) -> None:
        if self.pg_url:
            say(f"PostgreSQL: {sa.make_url(self.pg_url).render_as_string(hide_password=True)}")
            common.ensure_postgres_database(self.pg_url)
            common.prepare_schema(self.pg_url)
        if not self.args.skip_sqlite:
            self.sqlite = common.SqliteFiles(self.workdir, self.args.accounts)

    @contextlib.contextmanager
    def fresh_database(self, db: str | None, label: str) -> Iterator[str | None]:
        """A database in its initial state (seeded accounts, empty tables) for one run."""
        if db is None:
            yield None
        elif db == "postgresql":
            assert self.pg_url
            common.reset_postgres(self.pg_url, self.args.accounts)
            yield self.pg_url
        else:
            assert self.sqlite
            url = self.sqlite.fresh(label)
            try:
                yield url
            finally:
                self.sqlite.remove(url)

    # -- topics --

    def produce(self, what: str, count: int, partitions: int, hot: bool = False) -> str:
        topic = self.name(what)
        seconds = common.produce_transfers(self.bootstrap, topic, count, prefix=what, n_accounts=self.args.accounts,
                                           partitions=partitions, hot=hot)
        say(f"produced {count:,} records to {topic} ({partitions} partitions) in {seconds:.1f} s "
            f"({count / seconds:,.0f}/s)")
        return topic

    # -- one variant, two phases --

    def two_phase(self, key: str, label: str, mode: str, db: str | None, topic: str, *,
                  handler: str | None = None, batch_size: int | None = None, latency: bool = True,
                  record: bool = True, no_crc32c: bool = False, kafka_client: str | None = None,
                  profile: Path | None = None, per_transaction: int | None = None) -> dict[str, Any] | None:
        """Run one variant (a second attempt after a failure); its row, or None when it failed twice.

        A variant the worker says cannot run here is recorded as *not available*
        (with the reason); one whose self-check fails is recorded as FAILED.
        """
        options = {"handler": handler, "batch_size": batch_size, "latency": latency, "no_crc32c": no_crc32c,
                   "kafka_client": kafka_client, "profile": profile, "per_transaction": per_transaction}
        base = {"key": key, "label": label, "db": db, "batch_size": batch_size}
        for attempt in (1, 2):
            try:
                row = self._attempt(key, label, mode, db, topic, options)
            except NotAvailable as exc:
                say(f"  {label:<55} {report.DB_NAMES[db]:<10} not available: {exc}")
                row = {**base, "status": f"not available: {exc}"}
                if record:
                    self.results["variants"].append(row)
                return None
            except (BenchError, sa.exc.SQLAlchemyError) as exc:
                message = f"{label} on {report.DB_NAMES[db]} (attempt {attempt}): {type(exc).__name__}: {exc}"
                say(f"FAILED {message}")
                if attempt == 2:
                    self.results["errors"].append(message)
                    if record:
                        self.results["variants"].append({**base, "status": f"FAILED: {type(exc).__name__}"})
                continue
            if row["status"] != "ok":
                say(f"  {label:<55} {report.DB_NAMES[db]:<10} {row['status']}")
                self.results["errors"].append(f"{label} on {report.DB_NAMES[db]}: {row['status']}")
                if record:
                    self.results["variants"].append(row)
                return None
            latency_text = f"  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms" if "p50_ms" in row else ""
            say(f"  {label:<55} {report.DB_NAMES[db]:<10} {row['count']:>8,} records "
                f"{row['rate']:>9,.0f} msgs/s  peak RSS {row['peak_rss_kb'] / 1024:4.0f} MiB{latency_text} "
                f"[CRC {row['crc']}; check ok]")
            if record:
                self.results["variants"].append(row)
            return row
        return None

    def _attempt(self, key: str, label: str, mode: str, db: str | None, topic: str,
                 options: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        with self.fresh_database(db, key) as url:
            spec = self.spec(mode=mode, topic=topic, group=self.name(f"g-{key}"), messages=args.messages,
                             max_seconds=args.max_seconds, database_url=url, handler=options["handler"],
                             batch_size=options["batch_size"], accounts=args.accounts,
                             kafka_client=options["kafka_client"], emit_first=options["profile"] is not None,
                             per_transaction=options["per_transaction"])
            if options["latency"] and args.latency_messages:
                spec["latency_topic"] = self.name(f"lat-{key}")
                spec["latency_messages"] = args.latency_messages
                common.create_topic(self.bootstrap, spec["latency_topic"], 1)
            env = {NO_CRC32C_ENV: "1"} if options["no_crc32c"] else None
            child = Child(spec, self.logs / f"{spec['group']}.log", env)
            try:
                row = self._two_phase(child, spec, key, label, db, options["profile"])
            except BaseException:
                child.kill()
                raise
            child.close()
            return row

    def _two_phase(self, child: Child, spec: dict[str, Any], key: str, label: str,
                   db: str | None, profile: Path | None) -> dict[str, Any]:
        args = self.args
        spy = None
        if profile is not None:
            child.wait("first", (args.max_seconds or 600) + 120)
            spy = profiling.attach(child.proc.pid, profile, self.logs / "py-spy.log")
        # The time cap starts at the first record: allow for start-up, the group join and the tail.
        try:
            throughput = child.wait("throughput", (args.max_seconds or 600) + 120)
        finally:
            if spy is not None:
                profiling.detach(spy)
        check = throughput["check"]
        row: dict[str, Any] = {"key": key, "label": label, "db": db, "count": throughput["count"],
                               "rate": throughput["rate"], "elapsed": throughput["elapsed"],
                               "batch_size": spec["batch_size"], "crc": throughput["crc"],
                               "check": check["detail"],
                               "status": "ok" if check["ok"] else f"FAILED self-check: {check['detail']}"}
        if throughput["count"] < args.messages and not args.max_seconds:
            raise BenchError(f"only {throughput['count']} of {args.messages} records done")
        if "latency_topic" in spec:
            child.wait("ready", 90)
            common.paced_produce(self.bootstrap, spec["latency_topic"], args.latency_messages,
                                 args.latency_rate, prefix=f"lat{self.serial}", n_accounts=args.accounts)
            latency = child.wait("latency", 120)
            row.update(p50_ms=latency["p50_ms"], p99_ms=latency["p99_ms"], max_ms=latency["max_ms"])
        done = child.wait("done", 60)
        row.update(peak_rss_kb=done["peak_rss_kb"], retries=done["retries"])
        return row

    # -- sections --

    def section(self, name: str, fn: Callable[..., None], *fn_args: Any) -> None:
        """Run one section; an unexpected failure is reported and the next section still runs."""
        try:
            fn(*fn_args)
        except Exception as exc:
            say(f"FAILED section {name}: {type(exc).__name__}: {exc}")
            self.results["errors"].append(f"section {name}: {type(exc).__name__}: {exc}")

    def variants(self, topic: str) -> None:
        say("throughput, memory and latency: (a) raw, (b) hand-written, (c) ordinary, (d) batch handler, "
            "and the CRC and confluent-kafka variants")
        # Not recorded: the first read of the topic warms the broker (JVM, page cache). In the run of
        # 2026-12-03 04:19, (a) read first and came out below (d0), which reads the same records and also
        # claims them: the reference of every ratio was too low.
        self.two_phase("a-warm", "(warm-up) as (a), not recorded", "raw", None, topic, latency=False, record=False)
        self.two_phase("a", "(a) raw kafka-python consumer, no database", "raw", None, topic)
        self.two_phase("a-nocrc", "(a-nocrc) as (a), crc32c blocked: pure-Python CRC", "raw", None, topic,
                       latency=False, no_crc32c=True)
        self.two_phase("a-c", "(a-c) raw confluent-kafka consumer, no database", "raw-confluent", None, topic,
                       latency=False)
        for db in self.databases():
            self.two_phase("b", "(b) hand-written loop, 1 txn/record", "naive", db, topic)
            self.two_phase("b100", "(b100) as (b), 100 records/txn", "naive", db, topic, latency=False,
                           per_transaction=100)
            self.two_phase("c", "(c) exactlyonce ordinary handler, defaults", "eo", db, topic, handler="message")
            self.two_phase("d", "(d) exactlyonce batch handler, defaults", "eo", db, topic, handler="batch")
            self.two_phase("d100", "(d100) as (d), batch_size=100", "eo", db, topic, handler="batch",
                           batch_size=100, latency=False)
            self.two_phase("d0", "(d0) as (d), the handler writing nothing (dedup only)", "eo", db, topic,
                           handler="dedup-only", latency=False)
            self.two_phase("c-sql", "(c-sql) (c)'s statements alone, no Kafka, no exactlyonce", "sql", db, topic,
                           handler="message", latency=False)
            self.two_phase("d-sql", "(d-sql) (d)'s statements alone, no Kafka, no exactlyonce", "sql", db, topic,
                           latency=False)
            self.two_phase("d-c", '(d-c) as (d), kafka_client="confluent"', "eo", db, topic, handler="batch",
                           latency=False, kafka_client="confluent")
        if self.pg_url:
            self.two_phase("d-nocrc", "(d-nocrc) as (d), crc32c blocked: pure-Python CRC", "eo", "postgresql",
                           topic, handler="batch", latency=False, no_crc32c=True)

    def profile(self, topic: str) -> None:
        """(p) The default batch handler on PostgreSQL under py-spy: µs per message per stage."""
        say("(p) profile of the default batch handler, PostgreSQL (py-spy)")
        missing = profiling.available()
        if missing:
            self.results["profile"] = {"unavailable": missing}
            say(f"  not available: {missing}")
            return
        out = self.workdir / "profile.txt"
        row = self.two_phase("p", "(p) as (d), under py-spy", "eo", "postgresql", topic, handler="batch",
                             latency=False, record=False, profile=out)
        if row is None:
            self.results["profile"] = {"unavailable": "the profiled run failed (see Errors)"}
            return
        result = profiling.breakdown(out, row["count"])
        result.update(rate=row["rate"], count=row["count"])
        self.results["profile"] = result
        for stage in result["stages"]:
            say(f"  {stage['stage']:<36} {stage['us_per_message']:8.1f} µs/msg {stage['percent']:5.1f}%")

    def batch_sizes(self, topic: str) -> None:
        say("(f) throughput against batch size, ordinary handler, PostgreSQL")
        rows = []
        for size in self.args.batch_sizes:
            row = self.two_phase(f"f{size}", f"(f) ordinary handler, batch_size={size}", "eo", "postgresql",
                                 topic, handler="message", batch_size=size, latency=False, record=False)
            if row is not None:
                rows.append({"batch_size": size, "count": row["count"], "rate": row["rate"]})
        self.results["batch_sizes"] = rows

    def scaling(self) -> None:
        """(e) Worker processes in one group: batch and ordinary handlers, and the hot-row case."""
        args = self.args
        say(f"(e) scaling over 1..{args.max_workers} worker processes, PostgreSQL, 8 partitions")
        cases = {case.strip() for case in args.scaling_cases.split(",")}
        # (case, handler, records); each run produces its records once all its workers are in the group.
        runs = [("batch", "batch", args.scaling_messages), ("message", "message", args.hot_messages),
                ("hot", "message", args.hot_messages), ("hot-unbounded", "message", args.hot_messages)]
        rows = []
        for case, handler, total in (run for run in runs if run[0] in cases):
            for workers in range(1, args.max_workers + 1):
                for attempt in (1, 2):
                    try:
                        row = self._scale(case, handler, workers, total)
                    except (BenchError, sa.exc.SQLAlchemyError) as exc:
                        message = f"scaling {case} x{workers} (attempt {attempt}): {exc}"
                        say(f"FAILED {message}")
                        if attempt == 2:
                            self.results["errors"].append(message)
                            rows.append({"case": case, "handler": handler, "workers": workers,
                                         "status": f"FAILED: {type(exc).__name__}"})
                        continue
                    rows.append(row)
                    say(f"  {case:<8} x{workers}: {row['rate']:>9,.0f} msgs/s (steady {row['steady_rate']:,.0f}, "
                        f"min {row['window_s']:.1f} s window {row['min_window_rate']:,.0f}, longest pause "
                        f"{row['longest_pause_s']:.1f} s), per worker {row['per_worker']}, "
                        f"retries {row['retries']}, rebalances {row['rebalances']}; {row['status']}")
                    if row["status"] != "ok":
                        self.results["errors"].append(f"scaling {case} x{workers}: {row['status']}")
                    break
        self.results["scaling"] = rows

    def _scale(self, case: str, handler: str, workers: int, total: int) -> dict[str, Any]:
        """One scaling run: ``workers`` processes join an empty topic; once each has partitions, ``total`` records.

        Produced only then, so that the group's joins (one worker after
        another, each a rebalance that pauses every member) are not part of
        the measured run: a member busy with a long transaction on hot rows
        rejoins late, and with the records already there the last rebalance
        could come near the end of the run.
        """
        assert self.pg_url
        common.reset_postgres(self.pg_url, self.args.accounts)
        group = self.name(f"scale-{case}-{workers}")
        topic = self.name(f"scale-{case}-{workers}-topic")
        common.create_topic(self.bootstrap, topic, 8)
        unbounded = UNBOUNDED_LOCK_WAIT_S if case == "hot-unbounded" else None
        spec = self.spec(mode="scale", topic=topic, group=group, database_url=self.pg_url, handler=handler,
                         batch_size=None, batch_lock_timeout_s=unbounded)
        children = [Child(spec, self.logs / f"{group}-{n}.log") for n in range(workers)]
        engine = _db.create_engine(self.pg_url)
        samples: list[tuple[float, int]] = []
        try:
            for child in children:
                child.wait("ready", 120)
            common.produce_transfers(self.bootstrap, topic, total, prefix=case, n_accounts=self.args.accounts,
                                     partitions=8, hot=case.startswith("hot"), create=False)
            deadline = time.monotonic() + self.args.scaling_timeout
            while True:
                count = common.count_processed(engine)
                samples.append((time.time(), count))
                if count >= total:
                    break
                dead = [c for c in children if c.proc.poll() is not None]
                if dead:
                    raise BenchError(f"a worker exited with {dead[0].proc.returncode}; see {dead[0].log_path}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{count} of {total} records after {self.args.scaling_timeout} s")
                time.sleep(0.25)
            for child in children:
                child.terminate()
            done = [child.wait("done", 60) for child in children]
            for child in children:
                child.close()
        except BaseException:
            for child in children:
                child.kill()
            raise
        finally:
            engine.dispose()
        check = common.check_database(self.pg_url, total, accounts=self.args.accounts)
        active = [d for d in done if d["count"]]
        first = min(d["first_wall"] for d in active)
        last = max(d["last_wall"] for d in active)
        # The run ends when the last record is in the database; the rebalances of the workers
        # leaving the group after it (they are stopped one after another) are not part of it.
        end = next(t for t, count in samples if count >= total)
        assigned = [[t for t in d["assigned_walls"] if t < end] for d in done]
        since = max((t for walls in assigned for t in walls), default=0.0)
        window = window_s(samples, total, since)
        return {"case": case, "handler": handler, "workers": workers, "count": total,
                "rate": total / (last - first), "steady_rate": _steady_rate(samples, total),
                "min_window_rate": min_window_rate(samples, total, since=since, window=window),
                "window_s": window, "longest_pause_s": max(commit_gaps(samples, total, since), default=0.0),
                "per_worker": [d["count"] for d in done], "retries": sum(d["retries"] for d in done),
                "rebalances": max(len(walls) for walls in assigned) - 1,
                "peak_rss_kb": max(d["peak_rss_kb"] for d in done), "check": check["detail"],
                "status": "ok" if check["ok"] else f"FAILED self-check: {check['detail']}"}

    def soak(self) -> None:
        args = self.args
        say(f"(h) RSS over {args.soak_messages:,} records, batch handler, PostgreSQL")
        topic = self.produce("soak", args.soak_messages, 4)
        assert self.pg_url
        common.reset_postgres(self.pg_url, args.accounts)
        spec = self.spec(mode="soak", topic=topic, group=self.name("g-soak"), messages=args.soak_messages,
                         database_url=self.pg_url, handler="batch", batch_size=None, sample_every=args.soak_every)
        child = Child(spec, self.logs / f"{spec['group']}.log")
        try:
            done = child.wait("done", args.soak_messages / 500 + 600)
            child.close()
        except BenchError as exc:
            child.kill()
            say(f"FAILED soak: {exc}")
            self.results["errors"].append(f"soak: {exc}")
            return
        self.results["soak"] = done
        if not done["samples"]:
            return
        first = done["samples"][0]
        say(f"  {done['count']:,} records at {done['rate']:,.0f} msgs/s; RSS {first['rss_kb'] / 1024:.1f} MiB "
            f"after {first['messages']:,} -> {done['samples'][-1]['rss_kb'] / 1024:.1f} MiB "
            f"after {done['samples'][-1]['messages']:,}")

    def claims(self) -> None:
        args = self.args
        results: dict[str, Any] = {}
        for db in self.databases():
            rows = args.dedup_rows if db == "postgresql" else args.sqlite_dedup_rows
            say(f"(g) claim latency, {report.DB_NAMES[db]}: empty table vs {rows:,} rows")
            for attempt in (1, 2):
                try:
                    with self.fresh_database(db, "claims") as url:
                        assert url
                        results[db] = claims.bench_claims(url, rows, reps=args.claim_reps,
                                                          singles=args.claim_singles, progress=say)
                    break
                except sa.exc.SQLAlchemyError as exc:
                    message = f"claims on {db} (attempt {attempt}): {type(exc).__name__}: {exc}"
                    say(f"FAILED {message}")
                    if attempt == 2:
                        self.results["errors"].append(message)
        self.results["claims"] = results


def _steady_rate(samples: Sequence[tuple[float, int]], total: int) -> float:
    """Records/s between the samples where 10% and 90% of ``total`` were done."""
    lo = next(((t, n) for t, n in samples if n >= total * 0.1), None)
    hi = next(((t, n) for t, n in samples if n >= total * 0.9), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return float("nan")
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


# -- the broker -------------------------------------------------------------------


@contextlib.contextmanager
def start_broker(kind: str, notes: list[str]) -> Iterator[tuple[str, str]]:
    """A private broker of ``kind`` (kafka, tansu, or auto: kafka, else tansu); yields (bootstrap, description).

    Started the way the tests start theirs (``tests.services.brokers.private_broker``
    with ``$EXACTLYONCE_TEST_BROKER`` set to the kind): Apache Kafka from the
    cached jars in KRaft mode, or the embedded tansu broker.
    """
    from tests.services import brokers

    for candidate in (["kafka", "tansu"] if kind == "auto" else [kind]):
        os.environ[brokers.KIND_ENV] = candidate
        brokers.selected_kind.cache_clear()
        if candidate == "kafka":
            from tests.services.kafka import kafka_version

            description = f"Apache Kafka {kafka_version()} (one KRaft node, tests/services/kafka.py)"
        else:
            description = "embedded tansu (memory only)"
        try:
            with brokers.private_broker() as bootstrap:
                yield bootstrap, description
            return
        except brokers.BrokerUnavailable as exc:
            if kind != "auto" or candidate == "tansu":
                raise SystemExit(f"bench: no {candidate} broker: {exc}") from exc
            say(f"Apache Kafka is not available ({exc}); using the embedded tansu broker")
            notes.append(f"Apache Kafka was not available ({exc}): the run used the embedded tansu broker.")


# -- command line ---------------------------------------------------------------


QUICK = {"messages": 2000, "max_seconds": 10.0, "latency_messages": 50, "latency_rate": 100.0,
         "scaling_messages": 2000, "hot_messages": 600, "max_workers": 2, "dedup_rows": 20_000,
         "sqlite_dedup_rows": None,
         "soak_messages": 10_000, "soak_every": 2_500, "claim_reps": 5, "claim_singles": 50,
         "accounts": 100_000, "batch_sizes": "1,100", "session_timeout_ms": 2000}
FULL = {"messages": 100_000, "max_seconds": 20.0, "latency_messages": 1000, "latency_rate": 100.0,
        "scaling_messages": 30_000, "hot_messages": 6_000, "max_workers": 4, "dedup_rows": 10_000_000,
        "sqlite_dedup_rows": None,
        "soak_messages": 1_000_000, "soak_every": 100_000, "claim_reps": 30, "claim_singles": 300,
        "accounts": 100_000, "batch_sizes": "1,10,100,500", "session_timeout_ms": 6000}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke run under 2 minutes")
    parser.add_argument("--messages", type=int, help="records in the main topic (full 100k, quick 3k)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop a variant this long after its first record (0: never; full 30, quick 10)")
    parser.add_argument("--latency-messages", type=int, help="records in each latency phase (0: skip)")
    parser.add_argument("--latency-rate", type=float, help="records/s sent in the latency phase")
    parser.add_argument("--accounts", type=int, help="accounts the transfers move money between (max 1,000,000)")
    parser.add_argument("--batch-sizes", help="batch sizes for the plot (comma-separated; full 1,10,50,100,250,500)")
    parser.add_argument("--session-timeout-ms", type=int,
                        help="consumer session_timeout_ms (full 6000; quick 2000: the embedded broker's group "
                             "join takes about half of it)")
    parser.add_argument("--scaling-messages", type=int, help="records in the 8-partition scaling topic")
    parser.add_argument("--hot-messages", type=int,
                        help="records in the ordinary-handler and hot-row scaling topics (full 6k, quick 600)")
    parser.add_argument("--max-workers", type=int, help="scale from 1 to this many worker processes")
    parser.add_argument("--scaling-timeout", type=float, default=900.0, help="seconds allowed per scaling run")
    parser.add_argument("--dedup-rows", type=int, default=os.environ.get("BENCH_DEDUP_ROWS"),
                        help="rows in the big dedup table for claim latency (full 10M; env BENCH_DEDUP_ROWS)")
    parser.add_argument("--sqlite-dedup-rows", type=int, help="the same for SQLite (default: --dedup-rows)")
    parser.add_argument("--claim-reps", type=int, help="claim_many(500) repetitions per table size")
    parser.add_argument("--claim-singles", type=int, help="single claim() calls per table size")
    parser.add_argument("--soak-messages", type=int, help="records for the RSS run (full 1M)")
    parser.add_argument("--soak-every", type=int, help="sample RSS every this many records")
    parser.add_argument("--skip-variants", action="store_true", help="skip (a)-(d)")
    parser.add_argument("--skip-batch-sizes", action="store_true", help="skip (f)")
    parser.add_argument("--skip-scaling", action="store_true", help="skip (e)")
    parser.add_argument("--scaling-cases", default="batch,message,hot,hot-unbounded",
                        help="which (e) cases to run, comma-separated (default: batch,message,hot,hot-unbounded)")
    parser.add_argument("--skip-claims", action="store_true", help="skip (g)")
    parser.add_argument("--skip-soak", action="store_true", help="skip (h)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true", help="also skips (e), (f), (h) and PG claims")
    parser.add_argument("--postgres-url", help=f"default ${common.POSTGRES_URL_ENV} or {common.DEFAULT_POSTGRES_URL}")
    parser.add_argument("--broker", choices=("auto", "kafka", "tansu"), default="auto",
                        help="the broker to start: Apache Kafka from the tests' cached jars, the embedded tansu, "
                             "or auto (kafka when it can start, else tansu; default)")
    parser.add_argument("--bootstrap-servers", help="use this Kafka cluster instead of starting a broker")
    parser.add_argument("--skip-profile", action="store_true", help="skip (p), the py-spy profile")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR, help="where results.md and the plot go")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (worker logs, SQLite files)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.sqlite_dedup_rows is None:
        args.sqlite_dedup_rows = args.dedup_rows
    args.dedup_rows = int(args.dedup_rows)
    args.batch_sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    if not args.max_seconds:
        args.max_seconds = None
    if not 2 <= args.accounts <= 1_000_000:
        parser.error("--accounts must be between 2 and 1,000,000")
    return args


def _meta(args: argparse.Namespace, bench: Bench, argv: Sequence[str] | None) -> dict[str, Any]:
    import sqlite3

    postgres = "-"
    if bench.pg_url:
        engine = _db.create_engine(bench.pg_url)
        try:
            with engine.connect() as conn:
                postgres = str(conn.execute(sa.text("SHOW server_version")).scalar_one())
        finally:
            engine.dispose()
    payload = common.transfer_payload("main", 0, args.accounts, random.Random(0))
    return {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} cores",
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "kafka_python": version("kafka-python"), "sqlalchemy": version("SQLAlchemy"),
        "psycopg": version("psycopg"), "postgres": postgres, "sqlite": sqlite3.sqlite_version,
        "broker": bench.broker,
        "command": re.sub(r"://([^:/@]+):[^@/]+@", r"://\1:***@",
                          "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)),
        "payload_bytes": len(json.dumps(payload, separators=(",", ":"))),
        "accounts": args.accounts, "messages": args.messages, "partitions": 4,
        "max_seconds": args.max_seconds, "latency_messages": args.latency_messages,
        "latency_rate": args.latency_rate, "scaling_messages": args.scaling_messages,
        "soak_every": args.soak_every, "session_timeout_ms": args.session_timeout_ms,
        "hot_messages": args.hot_messages, "soak_messages": args.soak_messages, "dedup_rows": args.dedup_rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="exactlyonce-bench-"))
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.bootstrap_servers:
            bootstrap, broker = args.bootstrap_servers, f"external {args.bootstrap_servers}"
        else:
            bootstrap, broker = stack.enter_context(start_broker(args.broker, notes))
        say(f"broker {broker} at {bootstrap}; work dir {workdir}")
        bench = Bench(args, bootstrap, workdir)
        bench.broker = broker
        bench.results["notes"] += notes
        try:
            _sections(bench)
        finally:
            if args.keep_workdir or bench.results["errors"]:
                say(f"worker logs kept in {workdir / 'logs'}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    bench.results["notes"].append(f"The whole run took {time.monotonic() - started:.0f} s.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if report.plot(bench.results, args.out_dir / "throughput_vs_batch_size.png"):
            say(f"wrote {args.out_dir / 'throughput_vs_batch_size.png'}")
    except ImportError:
        say("matplotlib is not installed (pip install matplotlib): no plot")
        bench.results["notes"].append("No plot: matplotlib is not installed.")
    text = report.render(bench.results)
    (args.out_dir / "results.md").write_text(text + "\n")
    say(f"wrote {args.out_dir / 'results.md'}")
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1, default=str))
    print()
    print(text)
    return 1 if bench.results["errors"] else 0


def _sections(bench: Bench) -> None:
    args = bench.args
    bench.prepare()
    bench.results["meta"] = _meta(args, bench, None)
    if not args.skip_variants or (bench.pg_url and not (args.skip_batch_sizes and args.skip_profile)):
        topic = bench.produce("main", args.messages, 4)
        if not args.skip_variants:
            bench.section("variants", bench.variants, topic)
        if bench.pg_url and not args.skip_profile:
            bench.section("profile", bench.profile, topic)
        if bench.pg_url and not args.skip_batch_sizes:
            bench.section("batch sizes", bench.batch_sizes, topic)
    if bench.pg_url and not args.skip_scaling:
        bench.section("scaling", bench.scaling)
    if bench.pg_url and not args.skip_soak:
        bench.section("soak", bench.soak)
    if not args.skip_claims:
        bench.section("claims", bench.claims)


if __name__ == "__main__":
    sys.exit(main())
