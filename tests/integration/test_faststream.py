"""exactlyonce.faststream: FastStream Kafka subscribers, effectively once, on the real broker and databases.

- duplicates (the same message ID sent again) are acked without running the
  subscriber: one effect each;
- a failing subscriber is retried, then dead-lettered through FastStream's
  publisher with exactlyonce's headers (``dlq list`` reads them, ``replay``
  accepts them); ``DeadLetter``, ``Skip``, a missing ID and a fingerprint
  mismatch get the outcomes exactlyonce's own handlers get;
- the example service (examples/faststream_transfer.py), in a process killed
  between a transfer's database commit and its offset commit, then restarted:
  no transfer applied twice, money conserved;
- a database that refuses the claim for a while (transient): the record is
  read again, and applied once;
- a record FastStream cannot parse is dead-lettered, not lost; a subscriber
  that is not ``AckPolicy.MANUAL`` is refused and stopped; a subscriber that
  commits the session itself fails;
- the plain-library example (examples/aiokafka_deposits.py): ``claim`` in an
  aiokafka loop, read twice from the start, one effect per deposit.

SQLite through aiosqlite and PostgreSQL through psycopg's async mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from faststream import AckPolicy, BaseMiddleware
from faststream.kafka import KafkaBroker, KafkaRouter
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from exactlyonce import DeadLetter, Retry, Skip, _db, admin, migrate, publish
from exactlyonce.faststream import ExactlyOnce, MessageId, Record, Session
from exactlyonce.schema import counters, outbox
from tests.conftest import drop_all_tables

from .helpers import (
    Rec,
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    effects,
    process,
    produce,
    rec,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


# -- fixtures and helpers -----------------------------------------------------


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop (its fixtures are the coroutine function's)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]

    return run


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(sync URL, async URL) of a clean database with exactlyonce's tables and ``effects``."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        sync_url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_url")
        drop_all_tables(url)
        # postgresql+psycopg: one driver, sync and async.
        sync_url = async_url = _db.normalize_url(url).render_as_string(hide_password=False)
    engine = _db.create_engine(sync_url)
    try:
        migrate.upgrade(engine)
        create_effects(engine)
    finally:
        engine.dispose()
    return sync_url, async_url


@pytest.fixture
def sqlite_urls(tmp_path: Path) -> tuple[str, str]:
    """The same on SQLite only (for behaviour that does not depend on the database)."""
    path = tmp_path / "test.db"
    engine = _db.create_engine(f"sqlite:///{path}")
    try:
        migrate.upgrade(engine)
        create_effects(engine)
    finally:
        engine.dispose()
    return f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"


@contextlib.asynccontextmanager
async def serving(bootstrap: str, router: KafkaRouter, middlewares: tuple[Any, ...] = ()) -> AsyncIterator[KafkaBroker]:
    """A FastStream broker with ``router``, consuming for the ``async with`` block."""
    broker = KafkaBroker(bootstrap, middlewares=middlewares)
    broker.include_router(router)
    async with broker:
        await broker.start()
        yield broker


@contextlib.asynccontextmanager
async def async_engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``wait_until`` off the event loop (the predicates read Kafka and the database synchronously)."""
    return await asyncio.to_thread(wait_until, predicate, timeout, what, 0.3)


def caught_up(bootstrap: str, group: str, topic: str) -> bool:
    committed, end = committed_and_end_offsets(bootstrap, group, topic)
    return bool(end) and committed == end


def subscribe(router: KafkaRouter, topic: str, group: str, **kwargs: Any) -> Any:
    kwargs.setdefault("ack_policy", AckPolicy.MANUAL)
    return router.subscriber(topic, group_id=group, auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=1000, **kwargs)


def counter_totals(sync_url: str, scope: str) -> dict[str, int]:
    engine = _db.create_engine(sync_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(counters).where(counters.c.scope == scope)).one()
    finally:
        engine.dispose()
    return {name: row._mapping[name] for name in ("applied", "duplicates", "skipped", "dead_lettered",
                                                   "fingerprint_mismatches")}


def sync_engine(url: str) -> sa.Engine:
    return _db.create_engine(url)


# -- the middleware -------------------------------------------------------------


@run_async
async def test_duplicates_are_acked_without_running_the_subscriber(
    bootstrap_servers: str, urls: tuple[str, str]
) -> None:
    sync_url, async_url = urls
    topic, group = unique("fs-dedup"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [rec("a"), rec("b"), rec("a"), rec("c"), rec("b"), rec("a")])
    calls: list[str] = []
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

        @subscribe(router, topic, group)
        async def handle(body: bytes, session: Session, message_id: MessageId, record: Record) -> None:
            calls.append(message_id)
            await session.execute(sa.insert(effects).values(message_id=message_id, payload=body.decode(),
                                                            worker=str(record.offset)))
            # exactlyonce's outbox, in the same transaction (a sync Session API, through run_sync).
            await session.run_sync(publish, f"{topic}.out", body, message_id=f"out-{message_id}")

        async with serving(bootstrap_servers, router):
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")

    assert calls == ["a", "b", "c"]
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {"a": 1, "b": 1, "c": 1}
        rows = dedup_rows(engine_, f"{group}:{topic}")
        with engine_.connect() as conn:
            outbox_ids = list(conn.execute(sa.select(outbox.c.message_id)).scalars())
    finally:
        engine_.dispose()
    assert sorted(outbox_ids) == ["out-a", "out-b", "out-c"]
    assert [(r.message_id, r.outcome, r.kafka_offset) for r in rows] == [
        ("a", "applied", 0), ("b", "applied", 1), ("c", "applied", 3)]
    assert counter_totals(sync_url, f"{group}:{topic}") == {
        "applied": 3, "duplicates": 3, "skipped": 0, "dead_lettered": 0, "fingerprint_mismatches": 0}


@run_async
async def test_failures_are_dead_lettered_with_exactlyonces_headers(
    bootstrap_servers: str, urls: tuple[str, str]
) -> None:
    sync_url, async_url = urls
    topic, group = unique("fs-dlq"), unique("fs-group")
    dlq = f"{topic}.dlq"
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, dlq)
    produce(bootstrap_servers, topic, [
        Rec(b"fails", message_id="m-fail", key=b"k1", headers=(("trace", b"t-1"),)),
        rec("m-dead", "dead-letter me"),
        rec("m-skip", "skip me"),
        Rec(b"no id at all"),
        rec("m-ok", "ok"),
        rec("m-ok", "ok, but another payload"),
        rec("m-ok", "ok"),
    ])
    attempts: dict[str, int] = {}
    fixed = False
    engine = create_async_engine(async_url)
    try:
        router = KafkaRouter(middlewares=[ExactlyOnce(
            engine, retry=Retry(attempts=2, backoff=Retry().backoff / 10))])

        @subscribe(router, topic, group)
        async def handle(body: bytes, session: Session, message_id: MessageId) -> None:
            attempts[message_id] = attempts.get(message_id, 0) + 1
            # Written first: a failure must roll it back.
            await session.execute(sa.insert(effects).values(message_id=message_id, payload=body.decode()))
            if body == b"fails" and not fixed:
                raise ValueError("the subscriber cannot handle this")
            if body == b"dead-letter me":
                raise DeadLetter("not-for-us")
            if body == b"skip me":
                raise Skip("ignored on purpose")

        async with serving(bootstrap_servers, router):
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")
    except BaseException:
        await engine.dispose()
        raise

    assert attempts == {"m-fail": 2, "m-dead": 1, "m-skip": 1, "m-ok": 1}
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {"m-ok": 1}
        rows = {r.message_id: r.outcome for r in dedup_rows(engine_, f"{group}:{topic}")}
    finally:
        engine_.dispose()
    assert rows == {"m-fail": "dead_lettered", "m-dead": "dead_lettered", "m-skip": "skipped",
                    f"@{topic}/0/3": "dead_lettered", "m-ok": "applied", f"@{topic}/0/5": "dead_lettered"}
    assert counter_totals(sync_url, f"{group}:{topic}") == {
        "applied": 1, "duplicates": 1, "skipped": 1, "dead_lettered": 4, "fingerprint_mismatches": 1}

    reader = admin.KafkaReader(bootstrap_servers)
    try:
        letters = admin.read_dead_letters(reader, dlq)
    finally:
        reader.close()
    by_offset = {letter.meta["offset"]: letter for letter in letters}
    assert sorted(by_offset) == ["0", "1", "3", "5"]
    failed = by_offset["0"]
    assert (failed.key, failed.value) == (b"k1", b"fails")
    assert ("trace", b"t-1") in failed.headers and ("message-id", b"m-fail") in failed.headers
    assert {k: failed.meta[k] for k in ("reason", "error-type", "error-message", "topic", "partition",
                                        "message-id", "attempts", "scope")} == {
        "reason": "handler-error", "error-type": "ValueError", "error-message": "the subscriber cannot handle this",
        "topic": topic, "partition": "0", "message-id": "m-fail", "attempts": "2", "scope": f"{group}:{topic}"}
    assert admin.replay_problem(failed) is None
    assert (by_offset["1"].meta["reason"], by_offset["1"].meta["error-type"]) == ("not-for-us", "DeadLetter")
    assert (by_offset["3"].meta["reason"], by_offset["3"].meta["message-id"]) == ("invalid-message-id", "")
    assert by_offset["5"].meta["reason"] == "fingerprint-mismatch"
    assert by_offset["5"].value == b"ok, but another payload"

    # Once the subscriber is fixed, `exactlyonce dlq replay` sends the dead letter back: applied, once.
    fixed = True
    replay = [sys.executable, "-m", "exactlyonce", "dlq", "replay", dlq, "--id", "m-fail",
              "--database-url", sync_url, "--bootstrap-servers", bootstrap_servers]
    try:
        async with serving(bootstrap_servers, router):
            done = await asyncio.to_thread(subprocess.run, replay, capture_output=True, text=True, timeout=120,
                                           check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "1 replayed" in done.stdout
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the replayed record")
    finally:
        await engine.dispose()
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {"m-ok": 1, "m-fail": 1}
        assert {r.message_id: r.outcome for r in dedup_rows(engine_, f"{group}:{topic}")}["m-fail"] == "applied"
    finally:
        engine_.dispose()
    assert attempts["m-fail"] == 3


@run_async
async def test_a_transient_database_failure_reads_the_record_again(
    bootstrap_servers: str, sqlite_urls: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    sync_url, async_url = sqlite_urls
    topic, group = unique("fs-transient"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    calls: list[str] = []
    blocker = sa.create_engine(sync_url, connect_args={"isolation_level": None})
    engine = create_async_engine(async_url, connect_args={"timeout": 0.2})  # "database is locked" after 0.2 s
    try:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

        @subscribe(router, topic, group)
        async def handle(body: bytes, session: Session, message_id: MessageId) -> None:
            calls.append(message_id)
            await session.execute(sa.insert(effects).values(message_id=message_id))

        with blocker.connect() as lock:
            lock.exec_driver_sql("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock
            async with serving(bootstrap_servers, router):
                produce(bootstrap_servers, topic, [rec("x")])
                await eventually(lambda: "transient failure" in caplog.text, 60, "a transient failure")
                assert calls == []
                lock.exec_driver_sql("ROLLBACK")
                await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")
    finally:
        await engine.dispose()
        blocker.dispose()
    assert calls == ["x"]
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {"x": 1}
    finally:
        engine_.dispose()


@run_async
async def test_a_record_faststream_cannot_parse_is_dead_lettered(
    bootstrap_servers: str, sqlite_urls: tuple[str, str]
) -> None:
    sync_url, async_url = sqlite_urls
    topic, group = unique("fs-unparsable"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    # FastStream decodes every header value as UTF-8 before any subscriber runs.
    produce(bootstrap_servers, topic, [Rec(b"v1", message_id="u1", headers=(("binary", b"\xff\xfe"),)), rec("u2")])
    calls: list[str] = []
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

        @subscribe(router, topic, group)
        async def handle(session: Session, message_id: MessageId) -> None:
            calls.append(message_id)

        async with serving(bootstrap_servers, router):
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")
    assert calls == ["u2"]
    reader = admin.KafkaReader(bootstrap_servers)
    try:
        (letter,) = admin.read_dead_letters(reader, f"{topic}.dlq")
    finally:
        reader.close()
    assert letter.value == b"v1"
    assert (letter.meta["reason"], letter.meta["offset"], letter.meta["headers-omitted"]) == (
        "unparsable-record", "0", "1")
    assert ("message-id", b"u1") in letter.headers
    engine_ = sync_engine(sync_url)
    try:
        rows = {r.message_id: r.outcome for r in dedup_rows(engine_)}
    finally:
        engine_.dispose()
    assert rows == {f"@{topic}/0/0": "dead_lettered", "u2": "applied"}


@run_async
async def test_a_record_an_outer_middleware_fails_is_read_again_not_lost(
    bootstrap_servers: str, sqlite_urls: tuple[str, str]
) -> None:
    sync_url, async_url = sqlite_urls
    topic, group = unique("fs-outer"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [rec("o1"), rec("o2")])
    failures = {"o1": 2}

    class Flaky(BaseMiddleware):  # outside ExactlyOnce: fails o1 twice before it reaches the subscriber
        async def consume_scope(self, call_next: Any, msg: Any) -> Any:
            message_id = msg.headers.get("message-id")
            if failures.get(message_id):
                failures[message_id] -= 1
                raise RuntimeError("an outer middleware failed")
            return await call_next(msg)

    calls: list[str] = []
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

        @subscribe(router, topic, group)
        async def handle(session: Session, message_id: MessageId) -> None:
            calls.append(message_id)
            await session.execute(sa.insert(effects).values(message_id=message_id))

        async with serving(bootstrap_servers, router, middlewares=(Flaky,)):
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")
    assert calls == ["o1", "o2"]
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {"o1": 1, "o2": 1}
    finally:
        engine_.dispose()


@run_async
async def test_a_subscriber_that_is_not_manual_ack_is_refused_and_stopped(
    bootstrap_servers: str, sqlite_urls: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, async_url = sqlite_urls
    topic, group = unique("fs-refused"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [rec("r1"), rec("r2")])
    calls: list[str] = []
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

        subscriber = subscribe(router, topic, group, ack_policy=AckPolicy.ACK)

        @subscriber
        async def handle(message_id: MessageId) -> None:
            calls.append(message_id)

        async with serving(bootstrap_servers, router):
            await eventually(lambda: "refuses FastStream subscriber" in caplog.text, 60, "the refusal")
            await eventually(lambda: not subscriber.running, 30, "the subscriber to stop")
    assert calls == []
    assert "ack_policy=AckPolicy.MANUAL" in caplog.text


@run_async
async def test_a_subscriber_faststream_cannot_call_is_stopped_not_dead_lettered(
    bootstrap_servers: str, sqlite_urls: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    sync_url, async_url = sqlite_urls
    topic, group = unique("fs-undefined"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [rec("x1")])
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine)])
        subscriber = subscribe(router, topic, group)

        @subscriber
        async def handle(session: NotDefinedAnywhere) -> None:  # type: ignore[name-defined] # noqa: F821
            raise AssertionError("never called")

        async with serving(bootstrap_servers, router):
            await eventually(lambda: not subscriber.running, 60, "the subscriber to stop")
    assert "cannot be called: PydanticUserError" in caplog.text
    engine_ = sync_engine(sync_url)
    try:
        assert dedup_rows(engine_) == []  # not dead-lettered: the record waits for a fixed subscriber
    finally:
        engine_.dispose()
    committed, _ = committed_and_end_offsets(bootstrap_servers, group, topic)
    assert committed[0] is None


@run_async
async def test_a_subscriber_cannot_commit_the_transaction_itself(
    bootstrap_servers: str, sqlite_urls: tuple[str, str]
) -> None:
    sync_url, async_url = sqlite_urls
    topic, group = unique("fs-commit"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    produce(bootstrap_servers, topic, [rec("c1")])
    async with async_engine(async_url) as engine:
        router = KafkaRouter(middlewares=[ExactlyOnce(engine, retry=Retry(attempts=1))])

        @subscribe(router, topic, group)
        async def handle(session: Session, message_id: MessageId) -> None:
            await session.execute(sa.insert(effects).values(message_id=message_id))
            await session.commit()

        async with serving(bootstrap_servers, router):
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the group to catch up")
    engine_ = sync_engine(sync_url)
    try:
        assert effect_counts(engine_) == {}
        assert [(r.message_id, r.outcome) for r in dedup_rows(engine_)] == [("c1", "dead_lettered")]
    finally:
        engine_.dispose()
    reader = admin.KafkaReader(bootstrap_servers)
    try:
        (letter,) = admin.read_dead_letters(reader, f"{topic}.dlq")
    finally:
        reader.close()
    assert letter.meta["error-type"] == "ConfigurationError"
    assert "session.commit()" in letter.meta["error-message"]


def test_bad_settings_are_refused(sqlite_urls: tuple[str, str]) -> None:
    from exactlyonce.errors import ConfigurationError

    engine = create_async_engine(sqlite_urls[1])
    plain = sync_engine(sqlite_urls[0])
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        ExactlyOnce(plain)  # type: ignore[arg-type]
    plain.dispose()
    with pytest.raises(ConfigurationError, match="message_id"):
        ExactlyOnce(engine, message_id="transfer_id")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scope"):
        ExactlyOnce(engine, scope="")
    with pytest.raises(ConfigurationError, match="retry"):
        ExactlyOnce(engine, retry=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_fingerprint_mismatch"):
        ExactlyOnce(engine, on_fingerprint_mismatch="ignore")
    with pytest.raises(ConfigurationError):
        ExactlyOnce(engine, dead_letter_topic="no spaces allowed")


# -- killed between the database commit and the ack -----------------------------


def test_a_worker_killed_between_commit_and_ack_applies_nothing_twice(
    bootstrap_servers: str, urls: tuple[str, str], tmp_path: Path
) -> None:
    sync_url, async_url = urls
    topic, group = unique("fs-crash"), unique("fs-group")
    create_topic(bootstrap_servers, topic)
    positions = produce(bootstrap_servers, topic, [rec("e1"), rec("e2"), rec("e3")])
    env = {"EXAMPLE_BOOTSTRAP_SERVERS": bootstrap_servers, "EXAMPLE_DATABASE_URL": async_url,
           "EXAMPLE_TOPIC": topic, "EXAMPLE_GROUP": group}
    argv = [sys.executable, "-m", "tests.integration.faststream_worker", "effects"]
    engine = sync_engine(sync_url)
    try:
        with process(argv, tmp_path / "crashing.log", CRASH_AFTER_COMMIT="e2", **env) as worker:
            assert worker.wait(120) == 3, worker.log_tail()
        assert effect_counts(engine) == {"e1": 1, "e2": 1}  # e2's transaction committed ...
        committed, _ = committed_and_end_offsets(bootstrap_servers, group, topic)
        assert committed[0] == positions[1][1]  # ... its offset did not: it is read again

        with process(argv, tmp_path / "restarted.log", **env) as worker:
            wait_until(lambda: caught_up(bootstrap_servers, group, topic), 120,
                       f"the restarted worker to catch up\n{worker.log_tail()}", interval=0.3)
            assert worker.terminate() == 0, worker.log_tail()
        assert effect_counts(engine) == {"e1": 1, "e2": 1, "e3": 1}
        assert [(r.message_id, r.outcome) for r in dedup_rows(engine)] == [
            ("e1", "applied"), ("e2", "applied"), ("e3", "applied")]
    finally:
        engine.dispose()
    assert counter_totals(sync_url, f"{group}:{topic}")["duplicates"] == 1  # e2, read again


def _transfer(transfer_id: str, source: int, target: int, amount: int) -> Rec:
    value = {"transfer_id": transfer_id, "from": f"acct-{source}", "to": f"acct-{target}", "amount": amount}
    return Rec(json.dumps(value).encode())


def test_example_killed_between_commit_and_ack_applies_each_transfer_once(
    bootstrap_servers: str, urls: tuple[str, str], tmp_path: Path
) -> None:
    sync_url, async_url = urls
    topic, group = unique("bank-transfers"), unique("bank")
    create_topic(bootstrap_servers, topic)
    create_topic(bootstrap_servers, f"{topic}.dlq")
    sent = [
        _transfer("t1", 1, 2, 100),
        _transfer("t2", 2, 3, 300),       # the worker dies after committing this one, before its ack
        _transfer("t1", 1, 2, 100),       # re-sent by its producer
        _transfer("t3", 3, 1, 5000),      # overdraft: recorded as rejected
        _transfer("t4", 1, 9, 10),        # unknown account: DeadLetter
        Rec(b'{"transfer_id": "t5", "amount": -1}'),  # not a Transfer: validation fails, dead-lettered
        _transfer("t6", 4, 5, 1000),
    ]
    positions = produce(bootstrap_servers, topic, sent)
    env = {"EXAMPLE_BOOTSTRAP_SERVERS": bootstrap_servers, "EXAMPLE_DATABASE_URL": async_url,
           "EXAMPLE_TOPIC": topic, "EXAMPLE_GROUP": group}
    argv = [sys.executable, "-m", "tests.integration.faststream_worker", "example"]

    with process(argv, tmp_path / "crashing.log", CRASH_AFTER_COMMIT="t2", **env) as worker:
        assert worker.wait(120) == 3, worker.log_tail()
    engine = sync_engine(sync_url)
    try:
        from examples.faststream_transfer import accounts, transfers

        def applied() -> dict[str, str]:
            with engine.connect() as conn:
                return {r.transfer_id: r.status for r in conn.execute(sa.select(transfers))}

        assert applied() == {"t1": "applied", "t2": "applied"}  # t2's transaction committed ...
        committed, _ = committed_and_end_offsets(bootstrap_servers, group, topic)
        assert (committed[0] or 0) <= positions[1][1]  # ... its offset did not

        with process(argv, tmp_path / "restarted.log", **env) as worker:
            wait_until(lambda: caught_up(bootstrap_servers, group, topic), 120,
                       f"the restarted worker to catch up\n{worker.log_tail()}", interval=0.3)
            assert worker.terminate() == 0, worker.log_tail()

        assert applied() == {"t1": "applied", "t2": "applied", "t3": "rejected", "t6": "applied"}
        with engine.connect() as conn:
            balances = {r.id: r.balance for r in conn.execute(sa.select(accounts))}
        assert balances == {"acct-1": 900, "acct-2": 800, "acct-3": 1300, "acct-4": 0, "acct-5": 2000}
        scope = f"{group}:{topic}"
        rows = {r.message_id: r.outcome for r in dedup_rows(engine, scope)}
    finally:
        engine.dispose()
    assert rows == {"t1": "applied", "t2": "applied", "t3": "applied", "t4": "dead_lettered",
                    "t5": "dead_lettered", "t6": "applied"}
    totals = counter_totals(sync_url, scope)
    assert totals["duplicates"] == 2  # t2 read again after the crash, t1 re-sent
    reader = admin.KafkaReader(bootstrap_servers)
    try:
        letters = admin.read_dead_letters(reader, f"{topic}.dlq")
    finally:
        reader.close()
    assert sorted((d.meta["message-id"], d.meta["reason"]) for d in letters) == [
        ("t4", "unknown account acct-9"), ("t5", "handler-error")]
    assert {d.meta["message-id"]: d.meta["error-type"] for d in letters}["t5"] == "ValidationError"


# -- the plain-library path: claim() in an aiokafka loop ------------------------


@run_async
async def test_aiokafka_loop_example_applies_each_deposit_once(
    bootstrap_servers: str, urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiokafka import AIOKafkaConsumer

    from examples import aiokafka_deposits as example

    sync_url, async_url = urls
    topic, group = unique("deposits"), unique("deposits")
    monkeypatch.setattr(example, "SCOPE", f"{group}:{topic}")
    create_topic(bootstrap_servers, topic, partitions=2)

    def deposit(deposit_id: str, account: str, amount: int, partition: int) -> Rec:
        value = {"deposit_id": deposit_id, "account": account, "amount": amount}
        return Rec(json.dumps(value).encode(), partition=partition)

    produce(bootstrap_servers, topic, [
        deposit("d1", "acct-1", 100, 0), deposit("d2", "acct-1", 50, 1), deposit("d1", "acct-1", 100, 1),
        Rec(b"not json", partition=0), deposit("d3", "acct-2", 7, 0),
    ])

    async def run_once() -> None:
        consumer = AIOKafkaConsumer(topic, group_id=group, bootstrap_servers=bootstrap_servers,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    session_timeout_ms=6000, heartbeat_interval_ms=1000)
        stop = asyncio.Event()
        await consumer.start()
        try:
            task = asyncio.create_task(example.consume(consumer, engine, stop))
            await eventually(lambda: caught_up(bootstrap_servers, group, topic), 60, "the loop to catch up")
            stop.set()
            await task
        finally:
            await consumer.stop()

    engine = create_async_engine(async_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(example.metadata.create_all)
        await run_once()
        # As if the process had died before committing any offset: every record is read again.
        rewind = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False)
        try:
            rewind.commit({TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in (0, 1)})
        finally:
            rewind.close(autocommit=False)
        assert not caught_up(bootstrap_servers, group, topic)
        await run_once()
    finally:
        await engine.dispose()
    engine_ = sync_engine(sync_url)
    try:
        with engine_.connect() as conn:
            balances = {r.account: r.balance for r in conn.execute(sa.select(example.balances))}
        rows = {r.message_id: r.outcome for r in dedup_rows(engine_, f"{group}:{topic}")}
    finally:
        engine_.dispose()
    assert balances == {"acct-1": 150, "acct-2": 7}
    assert rows == {"d1": "applied", "d2": "applied", "d3": "applied"}

