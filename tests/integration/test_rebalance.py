"""Two workers in one group, with partitions moving between them mid-stream."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import App, Message

from .helpers import (
    create_effects,
    create_topic,
    dedup_rows,
    effect_counts,
    effect_rows,
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

PARTITIONS = 4
#: Records produced after the first worker has left (the tail of the stream).
TAIL = 20
#: A bound on the stream, in case a wait below never ends.
MAX_RECORDS = 600


def _worker(bootstrap: str, database_url: str, topic: str, group: str, name: str,
            kafka_client: str = "kafka-python") -> App:
    app = make_app(bootstrap, database_url, group=group, kafka_client=kafka_client)

    @app.handler(topic)
    def handle(message: Message, session: Session) -> None:
        insert_effect(session, (message.header("message-id") or b"").decode(), str(message.partition),
                      worker=name)
        time.sleep(0.01)  # slow enough that rebalances land between records

    return app


def _partitions_of(engine: sa.Engine, worker: str) -> set[str]:
    return {row.payload for row in effect_rows(engine) if row.worker == worker}


def _count_of(engine: sa.Engine, worker: str) -> int:
    return sum(1 for row in effect_rows(engine) if row.worker == worker)


@pytest.mark.timeout(180)
def test_rebalance_mid_stream_applies_every_record_once(bootstrap_servers: str, database_url: str) -> None:
    """A second worker joining and the first leaving while records stream in: all applied, none twice."""
    check_rebalance_mid_stream(bootstrap_servers, database_url)


def check_rebalance_mid_stream(bootstrap_servers: str, database_url: str, kafka_client: str = "kafka-python") -> None:
    """The test above with both workers' consumer on ``kafka_client`` (test_confluent_client runs it too)."""
    topic, group = unique("rebalance"), unique("rebalance-group")
    create_topic(bootstrap_servers, topic, PARTITIONS)
    engine = engine_for(database_url)
    create_effects(engine)
    produced: list[str] = []
    finish = threading.Event()
    producer_errors: list[BaseException] = []

    def stream() -> None:
        # About 20 records a second until told to finish, then a tail of TAIL more.
        try:
            tail = 0
            while tail < TAIL and len(produced) < MAX_RECORDS:
                message_id = f"r-{len(produced):04d}"
                produce(bootstrap_servers, topic, [rec(message_id, partition=len(produced) % PARTITIONS)])
                produced.append(message_id)
                if finish.is_set():
                    tail += 1
                time.sleep(0.05)
        except BaseException as exc:
            producer_errors.append(exc)

    first = _worker(bootstrap_servers, database_url, topic, group, "first", kafka_client)
    second = _worker(bootstrap_servers, database_url, topic, group, "second", kafka_client)
    producer = threading.Thread(target=stream, daemon=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(first))
        producer.start()
        wait_until(lambda: _count_of(engine, "first") >= 10, 60, "the first worker applying records")

        with running(second):  # joins mid-stream: a rebalance
            wait_until(lambda: _count_of(engine, "second") >= 5, 60, "the second worker getting partitions")
            applied_by_second = _count_of(engine, "second")
            stack.close()  # the first worker leaves mid-stream: another rebalance
            wait_until(lambda: _partitions_of(engine, "second") == {str(p) for p in range(PARTITIONS)}
                       and _count_of(engine, "second") >= applied_by_second + 10,
                       60, "the second worker taking over every partition")
            finish.set()
            producer.join(60)
            assert not producer.is_alive() and not producer_errors, producer_errors
            wait_all_committed(bootstrap_servers, group, topic, timeout=90)

    assert len(produced) < MAX_RECORDS
    counts = effect_counts(engine)
    assert counts == dict.fromkeys(produced, 1), {m: c for m, c in counts.items() if c != 1}
    assert total_effects(engine) == len(produced)
    assert len(dedup_rows(engine)) == len(produced)
    assert _count_of(engine, "first") + _count_of(engine, "second") == len(produced)
    engine.dispose()
