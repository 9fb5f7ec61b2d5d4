"""kafka-python against confluent-kafka: raw consume + JSON decode, and exactlyonce's batch handler on each.

    python -m bench.kafka_clients --bootstrap HOST:PORT --database-url postgresql://.../DB [--count 100000]

Fills one topic with ``--count`` transfers (bench.common's workload), then
reads all of it four times, each with a new group, one after the other in
this process: (raw) each client's consumer decoding every value as JSON
(no database), and (eo) an App whose batch handler (``batch=True,
batch_size=500``) decodes every value and writes nothing, with
``kafka_client`` set to each client. The rate is records over the time
from the first record received to the last one done (group joins excluded).
A quick comparison, not ``make bench``: one run, one partition count.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from typing import Any, cast

import confluent_kafka
import kafka

from bench.common import produce_transfers
from exactlyonce import App, Message, ids, migrate
from exactlyonce.storage import engine as _db

PARTITIONS = 4


class Clock:
    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.count = 0

    def tick(self, n: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.count += n
        self.last = now

    def rate(self) -> float:
        return self.count / (self.last - (self.first or self.last) or 1e-9)


def raw_kafka_python(bootstrap: str, topic: str, count: int) -> float:
    consumer = kafka.KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-kp-{uuid.uuid4().hex}",
                                   enable_auto_commit=False, auto_offset_reset="earliest",
                                   max_poll_records=500, fetch_max_wait_ms=10)
    clock = Clock()
    try:
        while clock.count < count:
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    json.loads(record.value)
                clock.tick(len(records))
    finally:
        consumer.close(autocommit=False)
    return clock.rate()


def raw_confluent(bootstrap: str, topic: str, count: int) -> float:
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-ck-{uuid.uuid4().hex}",
                                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                         "fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    clock = Clock()
    try:
        while clock.count < count:
            records = [r for r in consumer.consume(num_messages=500, timeout=0.2) if r.error() is None]
            for record in records:
                json.loads(cast(bytes, record.value()))  # a value each: the bench produced them
            if records:
                clock.tick(len(records))
    finally:
        consumer.close()
    return clock.rate()


def exactlyonce_batch(bootstrap: str, database_url: str, topic: str, count: int, client: str) -> float:
    config: dict[str, Any] = (
        {"fetch.wait.max.ms": 10} if client == "confluent" else {"fetch_max_wait_ms": 10})
    app = App(f"eo-{client}-{uuid.uuid4().hex}", bootstrap_servers=bootstrap, database_url=database_url,
              consumer_config=config, kafka_client=client, outbox=False)
    clock = Clock()

    @app.handler(topic, message_id=ids.json_field("transfer_id"), batch=True, batch_size=500)
    def handle(messages: list[Message], session: Any) -> None:
        for message in messages:
            json.loads(message.value or b"")
        clock.tick(len(messages))

    worker = threading.Thread(target=app.run, kwargs={"install_signal_handlers": False})
    worker.start()
    try:
        deadline = time.monotonic() + 600
        while app.stats["applied"] < count and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if app.stats["applied"] < count:
            raise SystemExit(f"{client}: {app.stats['applied']} of {count} applied: {dict(app.stats)}")
    finally:
        app.stop()
        worker.join(60)
        app.engine.dispose()
    return clock.rate()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = _db.create_engine(args.database_url)
    migrate.upgrade(engine)
    engine.dispose()
    topic = f"clients-{uuid.uuid4().hex[:8]}"
    seconds = produce_transfers(args.bootstrap, topic, args.count, prefix=topic, n_accounts=1000,
                                partitions=PARTITIONS)
    print(f"topic {topic}: {args.count} records, {PARTITIONS} partitions, produced in {seconds:.1f} s")
    results = {
        "raw kafka-python": raw_kafka_python(args.bootstrap, topic, args.count),
        "raw confluent-kafka": raw_confluent(args.bootstrap, topic, args.count),
        "exactlyonce batch, kafka-python": exactlyonce_batch(args.bootstrap, args.database_url, topic,
                                                             args.count, "kafka-python"),
        "exactlyonce batch, confluent": exactlyonce_batch(args.bootstrap, args.database_url, topic,
                                                          args.count, "confluent"),
    }
    base = results["raw kafka-python"]
    for name, rate in results.items():
        print(f"{name:34s} {rate:10.0f} records/s  {rate / base:5.2f}x raw kafka-python")


if __name__ == "__main__":
    main()
