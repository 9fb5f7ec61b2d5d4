"""The transactional outbox: publish with the transaction, relay at least once, in key order."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import ConfigurationError, Message, Retry, migrate, publish
from exactlyonce.outbox import Relay, _decode_headers, prune, release
from exactlyonce.schema import outbox

from .helpers import (
    create_effects,
    create_topic,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    process,
    produce,
    read_topic,
    rec,
    running,
    subprocess_env,
    unique,
    wait_until,
)


def _rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(outbox).order_by(outbox.c.id)).all())


def _count(engine: sa.Engine, *, sent: bool) -> int:
    condition = outbox.c.sent_at.is_not(None) if sent else outbox.c.sent_at.is_(None)
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox).where(condition)).scalar_one())


def _reader(database_url: str) -> sa.Engine:
    """An engine whose reads wait for no writer (the library's SQLite engines BEGIN IMMEDIATE every transaction)."""
    return sa.create_engine(database_url) if database_url.startswith("sqlite") else engine_for(database_url)


def _publish_many(engine: sa.Engine, topic: str, count: int, keys: int) -> list[tuple[str, bytes]]:
    """Publish ``count`` records over ``keys`` keys in one transaction; return (message ID, key) in id order."""
    published = [(f"m-{n:04d}", f"key-{n % keys}".encode()) for n in range(count)]
    with Session(engine) as session, session.begin():
        for message_id, key in published:
            publish(session, topic, {"n": message_id}, key=key, message_id=message_id)
    return published


def _message_id(record: Any) -> str:
    return str(dict(record.headers)["message-id"].decode())


def _by_key(records: list[Any]) -> dict[bytes, list[str]]:
    """Each key's message IDs in the order its partition holds them."""
    ordered: dict[bytes, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        ordered.setdefault(record.key, []).append(_message_id(record))
    return ordered


def _expected_by_key(published: list[tuple[str, bytes]]) -> dict[bytes, list[str]]:
    expected: dict[bytes, list[str]] = {}
    for message_id, key in published:
        expected.setdefault(key, []).append(message_id)
    return expected


# -- publish ----------------------------------------------------------------


def test_publish_commits_and_rolls_back_with_the_callers_transaction(database_url: str) -> None:
    """publish() writes only through the caller's transaction: a rollback leaves nothing, a commit the exact row."""
    engine = engine_for(database_url)
    with Session(engine) as session:
        session.begin()
        publish(session, "orders", b"rolled back")
        session.rollback()
    assert _rows(engine) == []

    before = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    with Session(engine) as session, session.begin():
        generated = publish(session, "orders", {"b": 1, "a": [1, 2]}, key="clé",
                            headers=[("trace", b"\x00\xff"), ("message-id", b"replaced")])
        assert publish(session, "orders", "text", key="clé", message_id="given-1") == "given-1"
    with engine.begin() as conn:
        third = publish(conn, "other.topic", b"raw", key=b"\x00\x01")
    rows = _rows(engine)
    assert [(r.topic, r.key, r.value, r.message_id, r.sent_at) for r in rows] == [
        ("orders", "clé".encode(), b'{"a":[1,2],"b":1}', generated, None),
        ("orders", "clé".encode(), b"text", "given-1", None),
        ("other.topic", b"\x00\x01", b"raw", third, None),
    ]
    assert len(generated) == 36 and generated[14] == "7"
    assert [_decode_headers(r.headers) for r in rows] == [[("trace", b"\x00\xff")], [], []]
    assert rows[0].ordering_key == rows[1].ordering_key != rows[2].ordering_key
    assert all(before <= r.created_at <= datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=1) for r in rows)

    with Session(engine) as session, session.begin():
        for kwargs in ({"topic": "no such topic!"}, {"topic": "t", "message_id": "x" * 256},
                       {"topic": "t", "headers": [("h", "text")]}):
            with pytest.raises(ConfigurationError):
                publish(session, value=b"v", **kwargs)
    assert len(_rows(engine)) == 3
    engine.dispose()


# -- App.run() relays what its handlers publish -------------------------------


@pytest.mark.timeout(120)
def test_handler_publish_is_relayed_only_if_the_handler_commits(bootstrap_servers: str, database_url: str) -> None:
    """A handler that publishes then fails leaves no outbox row; a successful one's record is relayed by App.run()."""
    source, target = unique("ob-in"), unique("ob-out")
    for name in (source, f"{source}.dlq", target):
        create_topic(bootstrap_servers, name)
    engine = engine_for(database_url)
    app = make_app(bootstrap_servers, database_url)

    @app.handler(source, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        message_id = (message.header("message-id") or b"").decode()
        publish(session, target, {"from": message_id}, key=f"k-{message_id}", message_id=f"out-{message_id}",
                headers=[("trace", b"\x00\xff")])
        if message.value == b"fail":
            raise RuntimeError("failed after publishing")

    produce(bootstrap_servers, source, [rec("bad", "fail"), rec("good", "ok")])
    with running(app):
        wait_until(lambda: app.stats["applied"] == 1 and app.stats["dead_lettered"] == 1, 60, "both records handled")
        wait_until(lambda: _count(engine, sent=True) == 1, 30, "the outbox row relayed")
        records = wait_until(lambda: read_topic(bootstrap_servers, target), 30, "the relayed record")
    rows = _rows(engine)
    assert [(r.topic, r.key, r.message_id) for r in rows] == [(target, b"k-good", "out-good")]
    assert [(r.key, r.value, list(r.headers)) for r in records] == [
        (b"k-good", b'{"from":"good"}', [("trace", b"\x00\xff"), ("message-id", b"out-good")])
    ]
    assert [dict(r.headers)["x-exactlyonce-message-id"] for r in read_topic(bootstrap_servers, f"{source}.dlq")] \
        == [b"bad"]
    engine.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_app_on_a_database_at_an_old_revision_asks_for_an_upgrade(
    bootstrap_servers: str, database_url: str
) -> None:
    """On a database at revision 0002 (no outbox, no counters) App.run() stops with a clear error."""
    engine = engine_for(database_url)
    migrate.downgrade(engine, "0002")
    topic = unique("ob-old")
    create_topic(bootstrap_servers, topic)
    app = make_app(bootstrap_servers, database_url)
    app.handler(topic)(lambda message, session: None)
    with pytest.raises(ConfigurationError, match=r"exactlyonce_counters.*run `exactlyonce db upgrade`"):
        app.run(install_signal_handlers=False)
    assert not sa.inspect(engine).has_table(outbox.name)
    engine.dispose()


# -- relays killed, relays side by side ---------------------------------------

N_KILL = 500
KILL_KEYS = 20
CRASH_BATCH = 50


@pytest.mark.timeout(300)
def test_relay_killed_mid_publish_resends_and_the_consumer_applies_each_once(
    bootstrap_servers: str, database_url: str, tmp_path: Path
) -> None:
    """Relays SIGKILLed after sending (before marking sent) lose nothing; a downstream App applies each once."""
    topic = unique("ob-kill")
    create_topic(bootstrap_servers, topic, partitions=3)
    engine = engine_for(database_url)
    create_effects(engine)
    published = _publish_many(engine, topic, N_KILL, KILL_KEYS)

    # 1. Dies when about to mark its third batch sent: that batch is out and still pending.
    argv = [sys.executable, "-m", "tests.integration.relay_worker", "--database-url", database_url,
            "--bootstrap", bootstrap_servers, "--batch-size", str(CRASH_BATCH), "--crash-at-batch", "3"]
    with process(argv, tmp_path / "worker.log") as worker:
        assert worker.wait(60) == -signal.SIGKILL, worker.log_tail()
    assert _count(engine, sent=True) == 2 * CRASH_BATCH
    assert len(read_topic(bootstrap_servers, topic)) == 3 * CRASH_BATCH

    # 2. `exactlyonce relay` SIGKILLed at random moments (after 1 to 20 more rows are marked
    # sent) while it sends, a row per transaction.
    env = {"EXACTLYONCE_BOOTSTRAP_SERVERS": bootstrap_servers, "EXACTLYONCE_DATABASE_URL": database_url}
    relay_argv = [sys.executable, "-m", "exactlyonce", "relay", "--batch-size", "1"]
    rng = random.Random(7)
    reader = _reader(database_url)
    kills_mid_run = 0
    for attempt in range(4):
        target = _count(reader, sent=True) + rng.randint(1, 20)
        with process(relay_argv, tmp_path / f"relay-{attempt}.log", **env) as relay:
            try:
                wait_until(lambda: _count(reader, sent=True) >= target, 60,  # noqa: B023
                           f"{target} rows sent", interval=0.005)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{relay.log_tail()}") from None
            assert relay.popen.poll() is None, relay.log_tail()
        # Leaving the block SIGKILLed it; rows still pending show it was killed mid-run.
        kills_mid_run += _count(reader, sent=False) > 0
    assert kills_mid_run >= 3

    # 3. A last one finishes the outbox and exits 0 on SIGTERM.
    with process(relay_argv, tmp_path / "relay-last.log", **env) as relay:
        wait_until(lambda: _count(engine, sent=False) == 0, 120, "every row sent")
        assert relay.terminate() == 0, relay.log_tail()

    records = read_topic(bootstrap_servers, topic, timeout=60)
    received = [_message_id(r) for r in records]
    assert set(received) == {message_id for message_id, _ in published}
    assert len(received) >= N_KILL + CRASH_BATCH, "the crashed batch was sent again"
    # Each key's first copies are in publishing order; re-sent copies come later.
    first_copies = {key: list(dict.fromkeys(ids)) for key, ids in _by_key(records).items()}
    assert first_copies == _expected_by_key(published)

    # 4. An exactlyonce consumer downstream applies every message once.
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode())

    with running(app):
        wait_until(lambda: app.stats["applied"] + app.stats["duplicate"] == len(records), 120,
                   "every copy consumed")
    assert effect_counts(engine) == {message_id: 1 for message_id, _ in published}
    assert app.stats["applied"] == N_KILL and app.stats["duplicate"] == len(records) - N_KILL
    engine.dispose()
    reader.dispose()


N_PAIR = 300
PAIR_KEYS = 30


@pytest.mark.timeout(180)
def test_two_relays_at_once_send_each_row_once_in_key_order(bootstrap_servers: str, database_url: str) -> None:
    """Two relays over the same pending rows: each row is sent exactly once, each key's rows in id order."""
    topic = unique("ob-pair")
    create_topic(bootstrap_servers, topic, partitions=3)
    engine = engine_for(database_url)
    published = _publish_many(engine, topic, N_PAIR, PAIR_KEYS)
    engines = [engine_for(database_url) for _ in range(2)]
    relays = [Relay(e, bootstrap_servers, batch_size=20) for e in engines]
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), kwargs={"idle_wait": timedelta(milliseconds=50)})
               for r in relays]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: _count(engine, sent=False) == 0, 120, "every row sent")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for relay in relays:
            relay.close()
    records = read_topic(bootstrap_servers, topic, timeout=60)
    assert sorted(_message_id(r) for r in records) == [message_id for message_id, _ in published]
    assert _by_key(records) == _expected_by_key(published)
    assert sum(r.published for r in relays) == N_PAIR
    if not database_url.startswith("sqlite"):
        # Row locks, not a database-wide write lock: both took part.
        assert all(r.published > 0 for r in relays), [r.published for r in relays]
    for e in (engine, *engines):
        e.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["postgresql", "mysql"], ids=["postgresql", "mariadb"], indirect=True)
def test_relay_skips_rows_another_relay_holds_and_the_later_rows_of_their_keys(
    bootstrap_servers: str, database_url: str
) -> None:
    """Rows locked by another relay are skipped, and so are later rows of their keys; the rest goes at once."""
    topic = unique("ob-skip")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    with Session(engine) as session, session.begin():
        for message_id, key in [("a1", b"a"), ("b1", b"b"), ("a2", b"a"), ("c1", b"c"), ("b2", b"b"), ("d1", b"d")]:
            publish(session, topic, message_id, key=key, message_id=message_id)
    ids = {r.message_id: r.id for r in _rows(engine)}
    relay = Relay(engine_for(database_url), bootstrap_servers)
    try:
        # Another relay's transaction, in the middle of sending its batch of two: a1 and b1.
        with engine.connect() as other:
            other.execution_options(isolation_level="READ COMMITTED")
            with other.begin():
                taken = other.execute(sa.select(outbox.c.id).where(outbox.c.sent_at.is_(None))
                                      .order_by(outbox.c.id).limit(2).with_for_update(skip_locked=True))
                assert list(taken.scalars()) == [ids["a1"], ids["b1"]]
                assert relay.run_once() == 2
                assert [_message_id(r) for r in read_topic(bootstrap_servers, topic)] == ["c1", "d1"]
        assert relay.run_once() == 4
    finally:
        relay.close()
    assert [_message_id(r) for r in read_topic(bootstrap_servers, topic)] == ["c1", "d1", "a1", "b1", "a2", "b2"]
    assert _count(engine, sent=False) == 0
    engine.dispose()


@pytest.mark.timeout(120)
def test_a_record_the_producer_refuses_holds_back_only_its_key(bootstrap_servers: str, database_url: str) -> None:
    """A row larger than max_request_size is refused and stays so across restarts, holding back its key's later
    rows; other keys go once; released under a limit that fits, it and its successors go in order.

    (The broker's own refusals: tests/integration/test_outbox_refusals.py.)
    """
    topic = unique("ob-refused")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    with Session(engine) as session, session.begin():
        publish(session, topic, b"small", key=b"a", message_id="a1")
        publish(session, topic, b"x" * 5000, key=b"a", message_id="a2-large")
        publish(session, topic, b"small", key=b"a", message_id="a3")
        publish(session, topic, b"small", key=b"b", message_id="b1")
    for start in range(2):  # a restart changes nothing
        strict = Relay(engine, bootstrap_servers, producer_config={"max_request_size": 2000})
        try:
            assert strict.run_once() == (3 if start == 0 else 0)
            assert strict.run_once() == 0
        finally:
            strict.close()
    rows = {r.message_id: r for r in _rows(engine)}
    assert {m for m, r in rows.items() if r.sent_at is None} == {"a2-large", "a3"}
    assert rows["a2-large"].refused_at is not None and "MessageSizeTooLarge" in rows["a2-large"].refusal
    assert rows["a3"].refused_at is None
    assert [_message_id(r) for r in read_topic(bootstrap_servers, topic)] == ["a1", "b1"]
    # Released, under a limit that fits: the held rows go, in order, and nothing else again.
    assert release(engine) == 1
    relay = Relay(engine, bootstrap_servers)
    try:
        assert relay.run_once() == 2
    finally:
        relay.close()
    assert _count(engine, sent=False) == 0
    assert [_message_id(r) for r in read_topic(bootstrap_servers, topic)] == ["a1", "b1", "a2-large", "a3"]
    engine.dispose()


# -- pruning -------------------------------------------------------------------


def _age(engine: sa.Engine, message_ids: list[str], *, sent_ago: timedelta | None, created_ago: timedelta) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(sa.update(outbox).where(outbox.c.message_id.in_(message_ids)).values(
            created_at=now - created_ago, sent_at=None if sent_ago is None else now - sent_ago))


@pytest.mark.timeout(120)
def test_prune_deletes_sent_rows_past_the_window_never_pending_ones(bootstrap_servers: str, database_url: str) -> None:
    """prune() and `prune --outbox` delete rows sent before the window, in batches; pending rows always stay."""
    topic = unique("ob-prune")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    old = [m for m, _ in _publish_many(engine, topic, 25, 5)]
    with Session(engine) as session, session.begin():
        recent = [publish(session, topic, b"r", message_id=f"recent-{n}") for n in range(3)]
        pending = [publish(session, topic, b"p", message_id=f"pending-{n}") for n in range(4)]
        aged = [publish(session, topic, b"c", message_id=f"cli-{n}") for n in range(2)]
    _age(engine, old, sent_ago=timedelta(days=30), created_ago=timedelta(days=31))
    _age(engine, recent, sent_ago=timedelta(days=1), created_ago=timedelta(days=1))
    _age(engine, pending, sent_ago=None, created_ago=timedelta(days=60))
    _age(engine, aged, sent_ago=timedelta(days=20), created_ago=timedelta(days=20))

    batches: list[int] = []
    assert prune(engine, timedelta(days=25), batch_size=10, progress=batches.append) == 25
    assert batches == [10, 10, 5]
    assert {r.message_id for r in _rows(engine)} == {*recent, *pending, *aged}

    result = subprocess.run([sys.executable, "-m", "exactlyonce", "prune", "--outbox", "--older-than", "14d"],
                            env=subprocess_env(EXACTLYONCE_DATABASE_URL=database_url),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pruned 2 sent outbox rows" in result.stdout
    assert {r.message_id for r in _rows(engine)} == {*recent, *pending}

    # A running relay prunes past its retention and sends the pending rows.
    relay = Relay(engine, bootstrap_servers)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), kwargs={"retention": timedelta(hours=12)})
    thread.start()
    try:
        wait_until(lambda: {r.message_id: r.sent_at is not None for r in _rows(engine)}
                   == dict.fromkeys(pending, True), 30, "recent rows pruned and pending rows sent")
    finally:
        stop.set()
        thread.join(30)
        relay.close()
    assert sorted(_message_id(r) for r in read_topic(bootstrap_servers, topic)) == pending
    engine.dispose()


def test_relay_thread_stops_promptly_while_the_broker_does_not_answer(tmp_path: Path) -> None:
    """stop() mid-flush, the broker unreachable: the thread ends within seconds, the row stays pending, then goes out.

    Without a bound the flush waits for kafka-python's delivery timeout (two
    minutes) and stop() gives up on the thread after 10 s.
    """
    import time

    from exactlyonce.embedded import free_port
    from exactlyonce.outbox import RelayThread
    from tests.faultproxy import FaultProxy
    from tests.services.brokers import private_broker

    url = f"sqlite:///{tmp_path / 'relay-stop.db'}"
    engine = engine_for(url)
    migrate.upgrade(engine)
    broker_port, proxy_port = free_port(), free_port()
    with private_broker(broker_port, advertised_port=proxy_port) as bootstrap, \
            FaultProxy(broker_port, port=proxy_port) as proxy:
        topic = unique("relay-stop")
        create_topic(bootstrap, topic)
        relay = RelayThread(engine, bootstrap, {})
        relay.start()
        try:
            with Session(engine) as session, session.begin():
                publish(session, topic, b"first", message_id="first")
            wait_until(lambda: _count(engine, sent=True) == 1, 30, "the first row relayed")
            proxy.refuse()  # cut every connection, and refuse new ones
            with Session(engine) as session, session.begin():
                publish(session, topic, b"second", message_id="second")
            time.sleep(3)  # the relay picked the row up and waits for an acknowledgement
        finally:
            started = time.monotonic()
            relay.stop()
            took = time.monotonic() - started
        assert not relay._thread.is_alive(), "stop() left the relay thread behind"
        assert took < 5, f"stop() took {took:.1f}s"
        assert [row.message_id for row in _rows(engine) if row.sent_at is None] == ["second"]

        proxy.refuse(False)
        relay = RelayThread(engine, bootstrap, {})
        relay.start()
        try:
            wait_until(lambda: _count(engine, sent=False) == 0, 60, "the pending row relayed after the outage")
        finally:
            relay.stop()
        assert {_message_id(r) for r in read_topic(bootstrap, topic)} == {"first", "second"}
    engine.dispose()
