"""The guarantee with the worker's consumer on confluent-kafka (``App(kafka_client="confluent")``).

The same broker and databases as the kafka-python tests; the crash and
rebalance scenarios are those of test_crash_redelivery and test_rebalance,
run with the other client. Without confluent-kafka these tests skip, and
fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from exactlyonce import Message, TransientError
from tests.conftest import unavailable

from .helpers import (
    committed_and_end_offsets,
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    produce,
    rec,
    running,
    total_effects,
    unique,
    wait_all_committed,
    wait_until,
)
from .test_crash_redelivery import check_crash_redelivery
from .test_rebalance import check_rebalance_mid_stream

CLIENT = "confluent"


@pytest.fixture(autouse=True)
def _confluent_installed() -> None:
    if importlib.util.find_spec("confluent_kafka") is None:
        unavailable("confluent-kafka is not installed (pip install 'exactlyonce[confluent]')")


def _effects_app(bootstrap: str, database_url: str, topic: str, **kwargs: object):  # type: ignore[no-untyped-def]
    app = make_app(bootstrap, database_url, kafka_client=CLIENT, **kwargs)

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode(), (message.value or b"").decode())

    return app


@pytest.mark.timeout(120)
def test_duplicates_are_skipped_and_every_record_applied_once(bootstrap_servers: str, database_url: str) -> None:
    """Re-sent message IDs, across partitions and within one, are applied once; every other record once."""
    topic = unique("confluent-dedup")
    create_topic(bootstrap_servers, topic, 3)
    engine = engine_for(database_url)
    create_effects(engine)
    ids = [f"c-{i:03d}" for i in range(60)]
    resent = ids[:10]
    produce(bootstrap_servers, topic, [rec(mid, f"v{mid}", partition=i % 3) for i, mid in enumerate(ids)]
            + [rec(mid, f"v{mid}", partition=(i + 1) % 3) for i, mid in enumerate(resent)]
            + [rec(mid, f"v{mid}", partition=i % 3) for i, mid in enumerate(resent)])
    app = _effects_app(bootstrap_servers, database_url, topic)

    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)

    assert effect_counts(engine) == dict.fromkeys(ids, 1)
    assert total_effects(engine) == len(ids)
    assert sorted(r.message_id for r in dedup_rows(engine)) == ids
    assert app.stats["applied"] == len(ids)
    assert app.stats["duplicate"] == 2 * len(resent)
    engine.dispose()


@pytest.mark.timeout(120)
def test_offsets_are_committed_only_after_the_database_commit(bootstrap_servers: str, database_url: str) -> None:
    """While a record's transaction is open, the group's committed offset stays at or below that record."""
    topic = unique("confluent-order")
    create_topic(bootstrap_servers, topic, 1)
    engine = engine_for(database_url)
    create_effects(engine)
    app = make_app(bootstrap_servers, database_url, kafka_client=CLIENT)
    inside, release = threading.Event(), threading.Event()

    @app.handler(topic, batch_size=1)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode())
        if message.offset == 3:
            inside.set()
            assert release.wait(30)

    def committed() -> int | None:
        return committed_and_end_offsets(bootstrap_servers, app.group_id, topic)[0][0]

    with running(app), contextlib.ExitStack() as unblock:
        unblock.callback(release.set)  # a failed assertion must not leave the handler waiting
        produce(bootstrap_servers, topic, [rec(f"o-{i}") for i in range(3)])
        wait_until(lambda: committed() == 3, 60, "offsets 0-2 committed")
        produce(bootstrap_servers, topic, [rec(f"o-{i}") for i in range(3, 5)])
        assert inside.wait(60), "the handler never reached offset 3"
        # Offset 3 is inside its open transaction: neither it nor 4 may be committed yet.
        assert committed() == 3
        assert total_effects(engine) == 3
        release.set()
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    assert effect_counts(engine) == {f"o-{i}": 1 for i in range(5)}
    engine.dispose()


@pytest.mark.timeout(180)
def test_crash_between_db_commit_and_offset_commit_redelivers_and_skips(
    bootstrap_servers: str, database_url: str, tmp_path: Path, handler_kind: str
) -> None:
    """A worker killed after its database commit, before its offset commit: the next one skips the record.

    With a ``def`` and an ``async def`` handler: the worker's event loop and
    librdkafka's own threads together.
    """
    check_crash_redelivery(bootstrap_servers, database_url, tmp_path, handler_kind, kafka_client=CLIENT)


@pytest.mark.timeout(180)
def test_rebalance_between_two_workers_applies_every_record_once(bootstrap_servers: str, database_url: str) -> None:
    """A second worker joining and the first leaving mid-stream: every record applied once."""
    check_rebalance_mid_stream(bootstrap_servers, database_url, kafka_client=CLIENT)


@pytest.mark.timeout(60)
def test_a_broker_that_does_not_answer_is_a_transient_error() -> None:
    """librdkafka never fails at construction: the consumer gives up on the metadata, boundedly, as transient."""
    from exactlyonce._kafka.confluent import METADATA_TIMEOUT_S, ConfluentConsumer

    with pytest.raises(TransientError, match=r"no broker of 127\.0\.0\.1:1 answered"):
        ConfluentConsumer(bootstrap_servers="127.0.0.1:1", group_id="g", topics=["t"], config={},
                          on_revoked=lambda partitions, lost: None)
    assert METADATA_TIMEOUT_S <= 10

