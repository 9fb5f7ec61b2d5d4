"""Helpers for the integration tests: topics, producing, running Apps, polling.

Imported as ``tests.integration.helpers`` (the repository root is on
``sys.path`` through the editable install, and ``python -m`` adds the working
directory in the worker subprocesses).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from exactlyonce import App, _db

T = TypeVar("T")

#: Short group timeouts: a join takes about half the session timeout.
CONSUMER_CONFIG: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
#: The same, spelled for the confluent client (librdkafka's property names).
CONFLUENT_CONSUMER_CONFIG: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def consumer_config_for(kafka_client: str) -> dict[str, Any]:
    """The tests' short group timeouts for the consumer of ``kafka_client`` (``App(kafka_client=...)``)."""
    return dict(CONFLUENT_CONSUMER_CONFIG if kafka_client == "confluent" else CONSUMER_CONFIG)

#: The repository root: the working directory of worker subprocesses.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: The handlers' business table. ``message_id`` is deliberately NOT unique, so
#: that an effect applied twice shows up as two rows instead of an error.
effects_metadata = sa.MetaData()
effects = sa.Table(
    "effects",
    effects_metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("payload", sa.Text, nullable=True),
    sa.Column("worker", sa.String(50), nullable=False, default=""),
)


def unique(prefix: str) -> str:
    """A topic or group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- Kafka ------------------------------------------------------------------


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    """Create ``name`` with ``partitions`` partitions and wait until it is visible."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        wait_until(lambda: len(consumer.partitions_for_topic(name) or ()) == partitions, 15,
                   f"topic {name} with {partitions} partitions")
    finally:
        consumer.close()


@dataclass(frozen=True)
class Rec:
    """A record to produce. ``message_id=None`` sends no ``message-id`` header."""

    value: bytes | None
    message_id: str | None = None
    partition: int | None = None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = field(default=())


def rec(message_id: str | None, value: bytes | str | None = None, partition: int | None = None,
        key: bytes | None = None) -> Rec:
    """Shorthand: a record with a ``message-id`` header (value defaults to ``b"v:<id>"``)."""
    if value is None:
        value = f"v:{message_id}".encode()
    elif isinstance(value, str):
        value = value.encode()
    return Rec(value=value, message_id=message_id, partition=partition, key=key)


def produce(bootstrap: str, topic: str, records: Iterable[Rec]) -> list[tuple[int, int]]:
    """Send ``records`` in order, one acknowledged request each.

    Returns the ``(partition, offset)`` of each record. Each record is its own
    batch: the embedded broker (tansu) reports a partition's end offset as the
    last batch's base offset + 1, so multi-record batches would make
    ``end_offsets`` (and so every "all committed" check) wrong.
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    positions = []
    try:
        for r in records:
            headers = list(r.headers)
            if r.message_id is not None:
                headers.append(("message-id", r.message_id.encode()))
            meta = producer.send(topic, value=r.value, key=r.key, headers=headers,
                                 partition=r.partition).get(timeout=30)
            positions.append((meta.partition, meta.offset))
    finally:
        producer.close(timeout=10)
    return positions


def read_topic(bootstrap: str, topic: str, timeout: float = 15.0) -> list[Any]:
    """Every record currently in ``topic`` (all partitions), read without a group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=500)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end offsets {end}")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def committed_and_end_offsets(
    bootstrap: str, group: str, topic: str
) -> tuple[dict[int, int | None], dict[int, int]]:
    """The group's committed offset and the end offset of each partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        committed = {tp.partition: consumer.committed(tp) for tp in partitions}
        end = {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
        return committed, end
    finally:
        consumer.close(autocommit=False)


def all_committed(bootstrap: str, group: str, *topics: str) -> bool:
    """Whether ``group`` has committed every partition of ``topics`` up to its end offset."""
    for topic in topics:
        committed, end = committed_and_end_offsets(bootstrap, group, topic)
        if not end or committed != end:
            return False
    return True


def wait_all_committed(bootstrap: str, group: str, *topics: str, timeout: float = 60.0) -> None:
    """Wait until ``group`` has consumed and committed everything in ``topics``."""
    wait_until(lambda: all_committed(bootstrap, group, *topics), timeout,
               f"group {group} to commit {', '.join(topics)} to the end", interval=0.3)


def headers_of(record: Any) -> dict[str, str]:
    """A consumed record's headers as text (the last value of a repeated name)."""
    return {name: (value or b"").decode("utf-8", "replace") for name, value in record.headers or ()}


# -- Apps -------------------------------------------------------------------


def make_app(bootstrap: str, database_url: str, group: str | None = None, *,
             kafka_client: str = "kafka-python", **kwargs: Any) -> App:
    """An App on the test broker and database with short group timeouts, consuming with ``kafka_client``."""
    return App(group or unique("group"), bootstrap_servers=bootstrap, database_url=database_url,
               consumer_config=consumer_config_for(kafka_client), kafka_client=kafka_client, **kwargs)


@contextlib.contextmanager
def running(app: App, join_timeout: float = 20.0) -> Iterator[App]:
    """Run ``app`` in a background thread for the ``with`` block, then stop it.

    An exception that ends ``run()`` early is re-raised here, as is a ``run()``
    that does not return within ``join_timeout`` seconds of ``stop()``.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            app.run(install_signal_handlers=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"app-{app.group_id}", daemon=True)
    thread.start()
    try:
        yield app
    finally:
        app.stop()
        thread.join(join_timeout)
        if app._engine is not None:
            app._engine.dispose()
    if thread.is_alive():
        raise AssertionError(f"App.run() did not return within {join_timeout}s of stop()")
    if errors:
        raise errors[0]


def run_until_it_fails(app: App, timeout: float) -> BaseException:
    """Run ``app`` expecting ``run()`` to end by itself with an exception within ``timeout`` seconds; return it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            app.run(install_signal_handlers=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"app-{app.group_id}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        app.stop()
        thread.join(20)
        raise AssertionError(f"App.run() still running after {timeout}s (stats {dict(app.stats)})")
    if app._engine is not None:
        app._engine.dispose()
    if not errors:
        raise AssertionError("App.run() returned without an error")
    return errors[0]


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition",
               interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


# -- database ---------------------------------------------------------------


def engine_for(database_url: str) -> sa.Engine:
    """An engine configured the way the library configures its own."""
    return _db.create_engine(database_url)


def create_effects(engine: sa.Engine) -> None:
    """Create the ``effects`` business table."""
    effects_metadata.create_all(engine)


def insert_effect(session: Any, message_id: str, payload: str | None = None, worker: str = "") -> None:
    """Record one applied effect inside the handler's session (its transaction)."""
    session.execute(sa.insert(effects).values(message_id=message_id, payload=payload, worker=worker))


async def insert_effect_async(session: Any, message_id: str, payload: str | None = None, worker: str = "") -> None:
    """:func:`insert_effect` for an async handler: through its ``AsyncSession``, after a real await."""
    await asyncio.sleep(0)  # the worker's event loop runs other tasks here, inside the transaction
    await session.execute(sa.insert(effects).values(message_id=message_id, payload=payload, worker=worker))


def handler_of(kind: str, body: Callable[[Any, Any], None]) -> Callable[[Any, Any], Any]:
    """``body(message, session)`` as a handler of ``kind`` (the ``handler_kind`` fixture).

    ``sync``: ``body`` itself. ``async``: an ``async def`` handler, given an
    ``AsyncSession`` on the worker's event loop, that awaits the loop and then
    runs ``body`` through ``session.run_sync``: with the same session and
    transaction, and whatever ``body`` raises raised out of the coroutine.
    """
    if kind == "sync":
        return body
    assert kind == "async", kind

    async def handle(arg: Any, session: Any) -> None:
        await asyncio.sleep(0)
        await session.run_sync(lambda sync_session: body(arg, sync_session))

    return handle


def as_kind(kind: str) -> Callable[[Callable[[Any, Any], None]], Callable[[Any, Any], Any]]:
    """A decorator: the function below as a handler of ``kind`` (:func:`handler_of`), under ``@app.handler``."""
    return functools.partial(handler_of, kind)


def effect_counts(engine: sa.Engine) -> dict[str, int]:
    """How many effect rows each message ID has."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(effects.c.message_id, sa.func.count()).group_by(effects.c.message_id)
        ).all()
    return {message_id: count for message_id, count in rows}


def effect_rows(engine: sa.Engine) -> list[Any]:
    """All effect rows, in insertion order."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(effects).order_by(effects.c.seq)).all())


def dedup_rows(engine: sa.Engine, scope: str | None = None) -> list[Any]:
    """The rows of ``exactlyonce_processed`` (optionally for one scope)."""
    from exactlyonce.schema import processed

    stmt = sa.select(processed)
    if scope is not None:
        stmt = stmt.where(processed.c.scope == scope)
    with engine.connect() as conn:
        return list(conn.execute(stmt.order_by(processed.c.kafka_partition, processed.c.kafka_offset)).all())


def total_effects(engine: sa.Engine) -> int:
    """The number of effect rows."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(effects)).scalar_one())


# -- subprocesses -----------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a worker subprocess (this interpreter, repo root on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A subprocess whose combined output goes to a log file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the process's output, for assertion messages."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait(self, timeout: float) -> int:
        """Wait for the exit code; fail (with the log) after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit within {timeout}s:\n{self.log_tail()}") from None

    def terminate(self, timeout: float = 20.0) -> int:
        """Send SIGTERM and wait for the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        """Kill the process if it still runs (this process only, by its pid)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@contextlib.contextmanager
def process(argv: Sequence[str], log_path: Path, **env: str) -> Iterator[Proc]:
    """Run ``argv`` (from the repository root) for the ``with`` block; kill it if still alive."""
    proc = Proc(argv, log_path, subprocess_env(**env))
    try:
        yield proc
    finally:
        proc.close()
