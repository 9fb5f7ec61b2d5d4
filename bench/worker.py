"""One benchmark consumer in its own process: ``python -m bench.worker SPEC_JSON``.

Modes (``spec["mode"]``):

- ``raw``: kafka-python reading and JSON-decoding every record, no database (a);
- ``raw-confluent``: the same with confluent-kafka's consumer (a-c);
- ``naive``: a hand-written loop, one transaction per record (dedup INSERT ...
  ON CONFLICT DO NOTHING + the transfer), offsets committed per poll (b); with
  ``per_transaction``, that many records a transaction (b100);
- ``sql``: the topic read first (not timed), then only a handler's statements
  and a multi-row dedup INSERT, in transactions of the handler's default size:
  the batch handler's (d-sql), or the ordinary handler's record by record
  (``handler="message"``: c-sql);
- ``eo``: an exactlyonce App, ordinary (``handler="message"``: c, c1) or batch
  (``handler="batch"``: d) handler, or a batch handler that writes nothing
  (``handler="dedup-only"``: d0, exactlyonce's own cost); ``batch_size`` None
  leaves the handler's defaults; ``kafka_client`` is passed to the App;
- ``scale``: like ``eo`` until SIGTERM (several of these share one group);
- ``soak``: like ``eo`` (batch handler), sampling RSS every ``sample_every`` records.

``raw``/``naive``/``eo`` run two phases. The throughput phase reads the
pre-filled ``topic`` with a fresh group until ``messages`` records are done or
``max_seconds`` have passed since the first one. The latency phase (when
``latency_topic`` is set) subscribes a second fresh group to an empty topic,
reports ``ready`` once it has its partitions, and records, for each of the
``latency_messages`` records the parent then sends at a steady rate, the time
from the ``sent_at`` stamp to its database commit (to its decoding for raw).

After the throughput phase the worker checks its result (:func:`self_check`).
With ``$BENCH_NO_CRC32C`` set, ``import crc32c`` fails in the process, so
kafka-python checks CRCs in pure Python. A variant that cannot run here
reports ``unavailable`` with the reason.

Progress is reported as ``BENCH {json}`` lines on stdout; logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from bench.proc import block_crc32c_if_asked

block_crc32c_if_asked()  # before kafka-python is imported: it picks its CRC-32C at import

import kafka  # noqa: E402

# Only the standard library and kafka-python at the top: the raw variant's RSS
# must not include SQLAlchemy, psycopg or exactlyonce (imported where needed).
from bench.proc import CONSUMER_CONFIG, crc_implementation, emit, peak_rss_kb, percentile, rss_kb  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    import exactlyonce



@dataclass
class Tracker:
    """Counts records done and when; collects latencies.

    Handlers append each record's ``sent_at`` to ``pending``; :meth:`done_now`
    is called once they are durable (database commit; decoding for raw).
    """

    target: int | None = None
    max_seconds: float | None = None
    record_latency: bool = False
    on_progress: Callable[[Tracker], None] | None = None
    #: Called once, when the first record is touched (the profiler attaches then).
    on_first: Callable[[], None] | None = None
    pending: list[float] = field(default_factory=list)
    #: The IDs a raw consumer decoded (its self-check: every record once).
    ids: list[str] = field(default_factory=list)
    count: int = 0
    latencies: list[float] = field(default_factory=list)
    #: perf_counter and wall-clock times of the first record touched and the last one done.
    first: float | None = None
    last: float | None = None
    first_wall: float | None = None
    last_wall: float | None = None

    def start(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.first_wall = time.time()
            if self.on_first is not None:
                self.on_first()

    def done_now(self) -> None:
        if not self.pending:
            return
        now = time.time()
        if self.record_latency:
            self.latencies.extend(now - sent for sent in self.pending)
        self.count += len(self.pending)
        self.pending.clear()
        self.last = time.perf_counter()
        self.last_wall = now
        if self.on_progress is not None:
            self.on_progress(self)

    def finished(self) -> bool:
        if self.target is not None and self.count >= self.target:
            return True
        return bool(self.max_seconds and self.first is not None
                    and time.perf_counter() - self.first >= self.max_seconds)

    def summary(self) -> dict[str, Any]:
        elapsed = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        return {"count": self.count, "elapsed": elapsed,
                "rate": self.count / elapsed if elapsed > 0 else 0.0,
                "first_wall": self.first_wall, "last_wall": self.last_wall}

    def latency_summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {"count": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
                "max_ms": max(ms) if ms else None}


class Unavailable(Exception):
    """The variant cannot run here (an optional client missing, an option the App refuses)."""


class _ExactlyonceLog(logging.Handler):
    """Watches exactlyonce's log: partition assignment (ready) and transient retries."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.on_assigned: Callable[[], None] | None = None
        self.retries = 0
        #: Wall-clock times of the partition assignments received (more than one: a rebalance happened).
        self.assigned_walls: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("assigned partitions:"):
            self.assigned_walls.append(time.time())
        if text.startswith("assigned partitions:") and not text.endswith("none"):
            if self.on_assigned is not None:
                callback, self.on_assigned = self.on_assigned, None
                callback()
        elif "transient failure" in text or "rewinding" in text or "lost a lock conflict" in text:
            self.retries += 1


_EO_LOG = _ExactlyonceLog()


# -- exactlyonce --------------------------------------------------------------


def run_exactlyonce(spec: dict[str, Any], topic: str, group: str, tracker: Tracker, *,
                    on_ready: Callable[[], None] | None = None, signals: bool = False) -> None:
    """Run an App on ``topic`` until ``tracker`` is finished (or SIGTERM when ``signals``)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    import exactlyonce
    from bench.common import apply_transfers_batch
    from examples.transfer.service import parse_transfer, record_transfer

    # outbox=False: the workload is the transfer's balance updates and row; the
    # example also publishes statement entries, which the ledger would consume.
    app = _app(spec, group)
    message_id = exactlyonce.ids.json_field("transfer_id")
    # batch_size None: the handler's defaults (no batch_size given).
    sizing = {} if spec.get("batch_size") is None else {"batch_size": spec["batch_size"]}
    if spec["handler"] == "dedup-only":
        @app.handler(topic, message_id=message_id, batch=True, **sizing)
        def handle_nothing(messages: list[exactlyonce.Message], session: Session) -> None:
            # No business writes: what is left is exactlyonce's own work (claim, commit, offsets).
            tracker.pending.extend(m.json()["sent_at"] for m in messages)
    elif spec["handler"] == "batch":
        @app.handler(topic, message_id=message_id, batch=True, **sizing)
        def handle_batch(messages: list[exactlyonce.Message], session: Session) -> None:
            batch = [m.json() for m in messages]
            apply_transfers_batch(session, batch)
            tracker.pending.extend(t["sent_at"] for t in batch)
    else:
        @app.handler(topic, message_id=message_id, **sizing)
        def handle(message: exactlyonce.Message, session: Session) -> None:
            record_transfer(session, parse_transfer(message))  # the example service's workload
            tracker.pending.append(message.json()["sent_at"])

    def after_begin(session: Session, transaction: Any, connection: Any) -> None:
        tracker.start()

    def after_commit(session: Session) -> None:
        tracker.done_now()
        if tracker.finished():
            app.stop()

    def after_rollback(session: Session) -> None:
        tracker.pending.clear()  # those records are handled again

    listeners: list[tuple[str, Callable[..., Any]]] = [("after_begin", after_begin), ("after_commit", after_commit),
                 ("after_rollback", after_rollback)]
    for name, fn in listeners:
        event.listen(Session, name, fn)
    _EO_LOG.on_assigned = on_ready
    try:
        app.run(install_signal_handlers=signals)
    finally:
        for name, fn in listeners:
            event.remove(Session, name, fn)
        app.engine.dispose()


def _app(spec: dict[str, Any], group: str) -> exactlyonce.App:
    """The App of an exactlyonce variant; ``spec["kafka_client"]`` chooses the Kafka client.

    With ``kafka_client`` set, an App that refuses it (TypeError: no such
    argument yet; ConfigurationError: not installed or not supported) makes the
    variant *not available*, not a failure.
    """
    import exactlyonce

    # outbox=False: the workload is the transfer's balance updates and row; the
    # example also publishes statement entries, which the ledger would consume.
    kwargs: dict[str, Any] = {"bootstrap_servers": spec["bootstrap"], "database_url": spec["database_url"],
                              "consumer_config": consumer_config(spec), "outbox": False}
    if spec.get("batch_lock_timeout_s") is not None:
        kwargs["batch_lock_timeout"] = timedelta(seconds=spec["batch_lock_timeout_s"])
    if not spec.get("kafka_client"):
        return exactlyonce.App(group, **kwargs)
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"confluent_kafka is not installed ({exc})") from exc
    kwargs.update(consumer_config=spec["confluent_config"], kafka_client=spec["kafka_client"])
    try:
        return exactlyonce.App(group, **kwargs)
    except (TypeError, exactlyonce.ConfigurationError) as exc:
        raise Unavailable(f"App(kafka_client={spec['kafka_client']!r}) refused: {exc}") from exc


# -- plain kafka-python ----------------------------------------------------------


def consumer_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The consumer settings every variant shares (``spec["consumer_config"]`` overrides them)."""
    return {**CONSUMER_CONFIG, **spec.get("consumer_config", {})}


def _consumer(spec: dict[str, Any], topic: str, group: str) -> kafka.KafkaConsumer:
    consumer = kafka.KafkaConsumer(topic, bootstrap_servers=spec["bootstrap"], group_id=group,
                                   enable_auto_commit=False, auto_offset_reset="earliest", **consumer_config(spec))
    # The topic's partitions in the metadata cache before the first poll joins
    # the group, as exactlyonce's consumer does: an assignment computed without
    # them gives this member nothing for minutes ("No partition metadata").
    consumer.topics()
    return consumer


def run_raw(spec: dict[str, Any], topic: str, group: str, tracker: Tracker, *,
            on_ready: Callable[[], None] | None = None) -> None:
    """(a) Read and JSON-decode every record; commit offsets after each poll."""
    consumer = _consumer(spec, topic, group)
    try:
        while not tracker.finished():
            batch = consumer.poll(timeout_ms=200)
            if on_ready is not None and consumer.assignment():
                on_ready()
                on_ready = None
            for records in batch.values():
                tracker.start()
                for record in records:
                    decoded = json.loads(record.value)
                    tracker.ids.append(decoded["transfer_id"])
                    tracker.pending.append(decoded["sent_at"])
                    tracker.done_now()
            if batch:
                consumer.commit()
    finally:
        consumer.close(autocommit=False)


def run_raw_confluent(spec: dict[str, Any], topic: str, group: str, tracker: Tracker, *,
                      on_ready: Callable[[], None] | None = None) -> None:
    """(a-c) Like (a), with confluent-kafka's consumer (librdkafka): read, JSON-decode, commit per poll."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise Unavailable(f"confluent_kafka is not installed ({exc})") from exc
    config = {"bootstrap.servers": spec["bootstrap"], "group.id": group, "enable.auto.commit": False,
              "auto.offset.reset": "earliest", **spec["confluent_config"]}
    assigned: list[bool] = []
    consumer = confluent_kafka.Consumer(config)
    consumer.subscribe([topic], on_assign=lambda c, parts: assigned.append(bool(parts)))
    try:
        while not tracker.finished():
            records = consumer.consume(num_messages=500, timeout=0.2)
            if on_ready is not None and any(assigned):
                on_ready()
                on_ready = None
            good = [r for r in records if r.error() is None]
            if len(good) < len(records):
                raise RuntimeError(f"consumer error: {next(r.error() for r in records if r.error())}")
            if good:
                tracker.start()
            for record in good:
                decoded = json.loads(cast(bytes, record.value()))  # a value each: the bench produced them
                tracker.ids.append(decoded["transfer_id"])
                tracker.pending.append(decoded["sent_at"])
                tracker.done_now()
            if good:
                consumer.commit(asynchronous=False)
    finally:
        consumer.close()


def run_naive(spec: dict[str, Any], topic: str, group: str, tracker: Tracker, *,
              on_ready: Callable[[], None] | None = None) -> None:
    """(b) One transaction per record: dedup INSERT, the example's transfer, commit.

    ``spec["per_transaction"]`` records (default 1) share a transaction: (b100)
    runs the same statements 100 records a transaction, what batching
    commits gives by hand a handler that runs its statements one by one.
    Offsets are committed once per poll, after the poll's transactions.
    Same engine settings and same workload function as exactlyonce's variants.
    """
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    import exactlyonce
    from exactlyonce import _db
    from examples.transfer.service import parse_transfer, record_transfer

    claim = sa.text("INSERT INTO bench_naive_dedup (message_id) VALUES (:id) "
                    "ON CONFLICT DO NOTHING RETURNING message_id")
    per_transaction = int(spec.get("per_transaction") or 1)
    engine = _db.create_engine(spec["database_url"])
    consumer = _consumer(spec, topic, group)
    try:
        while not tracker.finished():
            batch = consumer.poll(timeout_ms=200)
            if on_ready is not None and consumer.assignment():
                on_ready()
                on_ready = None
            for records in batch.values():
                tracker.start()
                for start in range(0, len(records), per_transaction):
                    with Session(engine) as session, session.begin():
                        for record in records[start : start + per_transaction]:
                            message = exactlyonce.Message(topic=record.topic, partition=record.partition,
                                                          offset=record.offset, key=record.key, value=record.value)
                            transfer = message.json()
                            if session.execute(claim, {"id": transfer["transfer_id"]}).first() is not None:
                                record_transfer(session, parse_transfer(message))
                            tracker.pending.append(transfer["sent_at"])
                    tracker.done_now()
            if batch:
                consumer.commit()
    finally:
        consumer.close(autocommit=False)
        engine.dispose()


def run_sql(spec: dict[str, Any], topic: str, group: str, tracker: Tracker, *,
            on_ready: Callable[[], None] | None = None) -> None:
    """(d-sql), (c-sql): a handler's statements alone: no Kafka while timed, no exactlyonce.

    Reads the topic first (not timed: the tracker starts at the first
    transaction), then applies it in transactions of the handler's default
    size, each a multi-row dedup INSERT and the handler's statements: for
    ``handler="batch"`` (d-sql), :data:`exactlyonce.handler.DEFAULT_BATCH_SIZE`
    records a transaction and :func:`~bench.common.apply_transfers_batch`, as
    (d); for ``handler="message"`` (c-sql),
    :data:`exactlyonce.handler.DEFAULT_MESSAGE_BATCH_SIZE` records and the
    example's ``record_transfer`` called record by record, as (c). Its rate
    is what one connection can do with those statements on this machine,
    whatever runs around them: a reference for (d) and (c), in the same run.
    """
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    import exactlyonce
    from bench.common import apply_transfers_batch, naive_dedup
    from exactlyonce import _db
    from exactlyonce.handler import DEFAULT_BATCH_SIZE, DEFAULT_MESSAGE_BATCH_SIZE
    from examples.transfer.service import parse_transfer, record_transfer

    if on_ready is not None:
        raise Unavailable("(d-sql) and (c-sql) have no latency phase")
    per_record = spec.get("handler") == "message"
    # Decoded before timing; for (c-sql) also wrapped as the Messages its handler gets (and decodes again).
    transfers: list[dict[str, Any]] = []
    messages: list[exactlyonce.Message] = []
    consumer = _consumer(spec, topic, group)
    try:
        idle_since = time.monotonic()
        while len(transfers) < spec["messages"] and time.monotonic() - idle_since < 10:
            batch = consumer.poll(timeout_ms=200)
            for records in batch.values():
                transfers.extend(json.loads(record.value) for record in records)
                if per_record:
                    messages.extend(exactlyonce.Message(topic=r.topic, partition=r.partition, offset=r.offset,
                                                        key=r.key, value=r.value) for r in records)
                idle_since = time.monotonic()
    finally:
        consumer.close(autocommit=False)
    if len(transfers) < spec["messages"]:
        # A short read would time fewer records and still pass the self-check.
        raise RuntimeError(f"read {len(transfers):,} of {spec['messages']:,} records before timing")
    size = DEFAULT_MESSAGE_BATCH_SIZE if per_record else DEFAULT_BATCH_SIZE
    engine = _db.create_engine(spec["database_url"])
    try:
        for start in range(0, len(transfers), size):
            if tracker.finished():
                break
            tracker.start()
            chunk = transfers[start : start + size]
            with Session(engine) as session, session.begin():
                session.execute(sa.insert(naive_dedup), [{"message_id": t["transfer_id"]} for t in chunk])
                if per_record:
                    for message in messages[start : start + size]:
                        record_transfer(session, parse_transfer(message))
                else:
                    apply_transfers_batch(session, chunk)
            tracker.pending.extend(t["sent_at"] for t in chunk)
            tracker.done_now()
    finally:
        engine.dispose()


RUNNERS = {"raw": run_raw, "raw-confluent": run_raw_confluent, "naive": run_naive, "sql": run_sql,
           "eo": run_exactlyonce}


# -- modes -------------------------------------------------------------------------


def two_phases(spec: dict[str, Any]) -> None:
    runner = RUNNERS[spec["mode"]]
    tracker = Tracker(target=spec["messages"], max_seconds=spec.get("max_seconds"),
                      on_first=lambda: emit("first") if spec.get("emit_first") else None)
    runner(spec, spec["topic"], spec["group"], tracker)
    emit("throughput", **tracker.summary(), retries=_EO_LOG.retries, peak_rss_kb=peak_rss_kb(),
         rss_kb=rss_kb(), check=self_check(spec, tracker),
         crc="librdkafka's" if spec["mode"] == "raw-confluent" else crc_implementation())
    if spec.get("latency_topic"):
        latency = Tracker(target=spec["latency_messages"], record_latency=True)
        runner(spec, spec["latency_topic"], spec["group"] + "-latency", latency,
               on_ready=lambda: emit("ready"))
        emit("latency", **latency.latency_summary())
    emit("done", peak_rss_kb=peak_rss_kb(), retries=_EO_LOG.retries)


def self_check(spec: dict[str, Any], tracker: Tracker) -> dict[str, Any]:
    """After the throughput phase: was every record applied exactly once?

    Raw consumers: every decoded ID distinct. Database variants: dedup rows ==
    records committed == transfer rows (none for the handler writing nothing),
    distinct transfer IDs == transfer rows, and the sum of balances unchanged.
    """
    if spec["mode"] in ("raw", "raw-confluent"):
        distinct = len(set(tracker.ids))
        ok = distinct == tracker.count == len(tracker.ids)
        return {"ok": ok, "detail": f"{tracker.count:,} decoded, {distinct:,} distinct IDs"}
    from bench.common import check_database

    return check_database(spec["database_url"], tracker.count, accounts=spec["accounts"],
                          naive=spec["mode"] in ("naive", "sql"), writes=spec.get("handler") != "dedup-only")


def scale(spec: dict[str, Any]) -> None:
    tracker = Tracker()
    run_exactlyonce(spec, spec["topic"], spec["group"], tracker, signals=True, on_ready=lambda: emit("ready"))
    emit("done", **tracker.summary(), retries=_EO_LOG.retries, assigned_walls=_EO_LOG.assigned_walls,
         peak_rss_kb=peak_rss_kb())


def soak(spec: dict[str, Any]) -> None:
    every = spec["sample_every"]
    samples: list[dict[str, Any]] = []

    def sample(tracker: Tracker) -> None:
        if tracker.count >= (len(samples) + 1) * every:
            samples.append({"messages": tracker.count, "rss_kb": rss_kb(), "peak_rss_kb": peak_rss_kb()})

    tracker = Tracker(target=spec["messages"], on_progress=sample)
    run_exactlyonce(spec, spec["topic"], spec["group"], tracker)
    emit("done", **tracker.summary(), samples=samples, retries=_EO_LOG.retries, peak_rss_kb=peak_rss_kb())


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    eo_log = logging.getLogger("exactlyonce")
    eo_log.setLevel(logging.INFO)
    eo_log.addHandler(_EO_LOG)
    try:
        {"scale": scale, "soak": soak}.get(spec["mode"], two_phases)(spec)
    except Unavailable as exc:
        emit("unavailable", reason=str(exc))
        return 0
    except BaseException as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
