"""The stubborn producer: a cut connection loses nothing, and the consumer drops the copies."""

from __future__ import annotations

import threading
import time

from sqlalchemy.orm import Session

from exactlyonce import Message, Producer
from exactlyonce.embedded import free_port
from tests.faultproxy import FaultProxy
from tests.services.brokers import private_broker

from .helpers import (
    create_effects,
    create_topic,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    read_topic,
    running,
    unique,
    wait_until,
)


def test_send_stamps_message_ids(bootstrap_servers: str) -> None:
    """Every record carries a message-id header: the caller's, or a generated one."""
    topic = unique("stamp")
    create_topic(bootstrap_servers, topic)
    with Producer(bootstrap_servers) as producer:
        mine = producer.send(topic, {"n": 1}, key="k", message_id="given-1")
        generated = producer.send(topic, b"raw", headers=[("trace", b"t1")])
    records = read_topic(bootstrap_servers, topic)
    assert [dict(r.headers)["message-id"].decode() for r in records] == [mine, generated]
    assert mine == "given-1" and len(generated) == 36
    assert records[0].value == b'{"n":1}' and records[0].key == b"k"
    assert dict(records[1].headers)["trace"] == b"t1"


def test_connection_cuts_during_sends_lose_nothing_and_dedup_drops_the_copies(postgres_url: str) -> None:
    """Sending through a proxy that keeps cutting connections: every ID arrives, each is applied once."""
    from exactlyonce import migrate
    from tests.conftest import drop_all_tables

    drop_all_tables(postgres_url)
    engine = engine_for(postgres_url)
    migrate.upgrade(engine)
    create_effects(engine)
    broker_port, proxy_port = free_port(), free_port()
    with private_broker(broker_port, advertised_port=proxy_port) as bootstrap, \
            FaultProxy(broker_port, port=proxy_port) as proxy:
        topic = unique("stubborn")
        create_topic(bootstrap, topic, partitions=3)
        stop = threading.Event()

        def cutter() -> None:
            while not stop.wait(0.3):
                proxy.cut()

        cutting = threading.Thread(target=cutter)
        sent: list[str] = []
        with Producer(bootstrap, config={"request_timeout_ms": 3000, "delivery_timeout_ms": 6000}) as producer:
            cutting.start()
            try:
                for n in range(300):
                    sent.append(producer.send(topic, {"n": n}, key=str(n % 7), message_id=f"p-{n}"))
                    time.sleep(0.01)  # spread the sends over many cuts
                    if n % 50 == 49:
                        producer.flush()
            finally:
                stop.set()
                cutting.join()
        assert proxy.cuts > 3
        received = [dict(r.headers)["message-id"].decode() for r in read_topic(bootstrap, topic, timeout=60)]
        assert set(received) == set(sent), "nothing lost"

        app = make_app(bootstrap, postgres_url)

        @app.handler(topic)
        def handle(message: Message, session: Session) -> None:
            insert_effect(session, (message.header("message-id") or b"").decode())

        with running(app):
            # Not wait_all_committed: the producer sends multi-record batches,
            # whose end offsets the embedded broker reports too low.
            wait_until(lambda: app.stats["applied"] + app.stats["duplicate"] >= len(received), 120,
                       "every received record handled")
        assert effect_counts(engine) == dict.fromkeys(sent, 1)
        assert app.stats["applied"] == 300 and app.stats["duplicate"] == len(received) - 300
    engine.dispose()


def test_a_refused_record_raises_once_and_leaves_the_queue(bootstrap_servers: str) -> None:
    """A record the broker will never take raises ConfigurationError once; later sends still flush."""
    import pytest

    from exactlyonce import ConfigurationError

    topic = unique("refused")
    create_topic(bootstrap_servers, topic)
    producer = Producer(bootstrap_servers, config={"max_request_size": 1000})
    producer.send(topic, b"x" * 5000, message_id="too-big")
    with pytest.raises(ConfigurationError, match="too-big"):
        producer.flush()
    producer.send(topic, b"small", message_id="ok")
    producer.close()
    assert [dict(r.headers)["message-id"] for r in read_topic(bootstrap_servers, topic)] == [b"ok"]
