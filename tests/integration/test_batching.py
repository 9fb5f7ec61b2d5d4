"""Batched transactions: same guarantees, per-partition order, poison isolated by splitting."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import Message, Retry

from .helpers import (
    as_kind,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    effect_rows,
    engine_for,
    headers_of,
    insert_effect,
    insert_effect_async,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    unique,
    wait_all_committed,
)


def _id(message: Message) -> str:
    return (message.header("message-id") or b"").decode()


def test_batch_handler_gets_new_messages_in_partition_order(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """A batch handler sees each new ID once, duplicates removed, each partition's records in order."""
    topic = unique("batch")
    create_topic(bootstrap_servers, topic, partitions=2)
    engine = engine_for(database_url)
    create_effects(engine)
    ids = [f"m{n:03d}" for n in range(60)]
    # Every third record is re-sent right after itself, on the same partition.
    records = []
    for n, message_id in enumerate(ids):
        records.append(rec(message_id, partition=n % 2))
        if n % 3 == 0:
            records.append(rec(message_id, partition=n % 2))
    produce(bootstrap_servers, topic, records)
    calls: list[list[str]] = []
    app = make_app(bootstrap_servers, database_url)

    if handler_kind == "sync":
        @app.handler(topic, batch=True, batch_size=50)
        def handle(messages: list[Message], session: Session) -> None:
            calls.append([_id(m) for m in messages])
            for message in messages:
                insert_effect(session, _id(message), str(message.partition))
    else:
        @app.handler(topic, batch=True, batch_size=50)
        async def handle_async(messages: list[Message], session: AsyncSession) -> None:
            calls.append([_id(m) for m in messages])
            for message in messages:
                await insert_effect_async(session, _id(message), str(message.partition))

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == dict.fromkeys(ids, 1)
    assert all(len(batch) == len(set(batch)) for batch in calls), "no ID twice in one call"
    assert max(len(batch) for batch in calls) > 1, "records were handled in batches"
    per_partition: dict[str, list[str]] = defaultdict(list)
    for row in effect_rows(engine):
        per_partition[row.payload].append(row.message_id)
    assert per_partition == {"0": ids[0::2], "1": ids[1::2]}
    assert app.stats["applied"] == 60 and app.stats["duplicate"] == 20
    engine.dispose()


def test_poison_in_a_batch_is_isolated_and_the_rest_apply_once(
    bootstrap_servers: str, database_url: str, handler_kind: str
) -> None:
    """One failing record in a batch is split out and dead-lettered; every other record applies once, in order."""
    topic = unique("bisect")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    ids = [f"m{n:03d}" for n in range(40)]
    produce(bootstrap_servers, topic, [rec(i) for i in ids[:17]] + [rec("poison")] + [rec(i) for i in ids[17:]])
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic, batch_size=41, retry=Retry(attempts=2))
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, _id(message))
        if _id(message) == "poison":
            raise RuntimeError("poison")

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == dict.fromkeys(ids, 1)
    assert [r.message_id for r in effect_rows(engine)] == ids, "partition order kept around the split"
    (letter,) = read_topic(bootstrap_servers, f"{topic}.dlq")
    assert headers_of(letter)["message-id"] == "poison"
    assert headers_of(letter)["x-exactlyonce-attempts"] == "2"
    assert {r.message_id: r.outcome for r in dedup_rows(engine)}["poison"] == "dead_lettered"
    engine.dispose()


def test_mismatch_and_repeat_within_one_batch(bootstrap_servers: str, database_url: str, handler_kind: str) -> None:
    """Within one batch a repeated ID is a duplicate, and the same ID with another payload is dead-lettered."""
    topic = unique("inbatch")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    produce(bootstrap_servers, topic, [rec("a", "1"), rec("a", "1"), rec("a", "2"), rec("b", "1")])
    app = make_app(bootstrap_servers, database_url)

    @app.handler(topic, batch_size=10)
    @as_kind(handler_kind)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, _id(message), (message.value or b"").decode())

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert sorted((r.message_id, r.payload) for r in effect_rows(engine)) == [("a", "1"), ("b", "1")]
    (letter,) = read_topic(bootstrap_servers, f"{topic}.dlq")
    assert headers_of(letter)["x-exactlyonce-reason"] == "fingerprint-mismatch"
    assert app.stats["duplicate"] == 1 and app.stats["applied"] == 2
    engine.dispose()


def test_batch_wait_fills_batches_across_polls(bootstrap_servers: str, postgres_url: str) -> None:
    """With batch_wait, records arriving over several polls are handled in one batch."""
    import threading
    import time
    from datetime import timedelta

    from exactlyonce import migrate
    from tests.conftest import drop_all_tables

    drop_all_tables(postgres_url)
    migrate.upgrade(engine_for(postgres_url))
    topic = unique("wait")
    create_topic(bootstrap_servers, topic)
    sizes: list[int] = []
    app = make_app(bootstrap_servers, postgres_url, batch_wait=timedelta(seconds=3))

    @app.handler(topic, batch=True, batch_size=10)
    def handle(messages: list[Message], session: Session) -> None:
        sizes.append(len(messages))

    with running(app):
        time.sleep(4)  # joined and idle
        feeder = threading.Thread(target=lambda: [
            (produce(bootstrap_servers, topic, [rec(f"m{n}")]), time.sleep(0.1)) for n in range(10)])
        feeder.start()
        feeder.join()
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert sum(sizes) == 10
    assert max(sizes) >= 5, f"batches were not filled across polls: {sizes}"
