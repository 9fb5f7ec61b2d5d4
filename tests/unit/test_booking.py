"""Every outcome is booked once, and the four places it is counted agree.

Real Runners over the in-memory Kafka twins and SQLite: generated records
(fresh and repeated IDs, re-sends with another payload, missing IDs, handlers
that skip or fail, sequenced records out of order) go through the runtime;
then, per outcome, the runner's stats, the ``exactlyonce_messages_total``
metric and the ``exactlyonce_counters`` table must say the same number.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exactlyonce import App, Message, Retry, Skip, migrate
from exactlyonce.metrics import OUTCOMES
from exactlyonce.outcome import Outcome
from exactlyonce.runtime.booking import Bookkeeper
from exactlyonce.schema import counters
from exactlyonce.testing import Cluster

TOPIC, LEDGER = "orders", "ledger"

record = st.one_of(
    st.tuples(st.just(TOPIC), st.sampled_from(["a", "b", "c", None]), st.sampled_from(["ok", "ok", "skip", "fail"]),
              st.integers(1, 2)),
    st.tuples(st.just(LEDGER), st.sampled_from(["s", "t"]), st.integers(1, 4), st.integers(1, 2)),
)


def test_every_outcome_has_a_counter_column_and_a_metric_label() -> None:
    assert set(OUTCOMES) == {str(o) for o in Outcome}
    assert {o.column for o in Outcome} <= set(counters.c.keys())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=1, max_size=25), batch_size=st.sampled_from([1, 3, 100]))
def test_stats_metrics_and_counters_agree_on_every_outcome(
    tmp_path_factory: pytest.TempPathFactory, records: list[tuple[Any, ...]], batch_size: int
) -> None:
    url = f"sqlite:///{tmp_path_factory.mktemp('booking') / 'b.db'}"
    app = App("g", bootstrap_servers="twin:9092", database_url=url, outbox=False,
              transient_retry_budget=timedelta(0))
    migrate.upgrade(app.engine)
    quick = Retry(attempts=1)

    @app.handler(TOPIC, batch_size=batch_size, retry=quick)
    def handle(message: Message, session: Any) -> None:
        behaviour = message.json()["do"]
        if behaviour == "skip":
            raise Skip("asked to")
        if behaviour == "fail":
            raise RuntimeError("asked to")

    @app.handler(LEDGER, batch_size=batch_size, retry=quick,
                 sequence=lambda m: (m.json()["s"], m.json()["n"]))
    def handle_in_order(message: Message, session: Any) -> None:
        pass

    cluster = Cluster()
    for topic in (TOPIC, LEDGER, f"{TOPIC}.dlq", f"{LEDGER}.dlq"):
        cluster.create_topic(topic)
    for topic, first, second, payload in records:
        if topic == TOPIC:
            headers = [] if first is None else [("message-id", first.encode())]
            value = json.dumps({"do": second, "p": payload}).encode()
        else:
            headers = []
            value = json.dumps({"s": first, "n": second, "p": payload}).encode()
        cluster.append(topic, 0, value=value, headers=headers)
    try:
        cluster.run_until_read(app)
        with app.engine.connect() as conn:
            sums = conn.execute(sa.select(*(sa.func.coalesce(sa.func.sum(counters.c[o.column]), 0)
                                            for o in Outcome))).one()
        in_database = {str(o): int(n) for o, n in zip(Outcome, sums, strict=True)}
        in_stats = {str(o): app.stats[str(o)] for o in Outcome}
        in_metrics = {
            str(o): int(sum(app.metrics.registry.get_sample_value(
                "exactlyonce_messages_total", {"scope": handler.scope, "outcome": str(o)}) or 0
                for handler in app.handlers.values()))
            for o in Outcome
        }
        assert in_stats == in_metrics == in_database
        # Every record was decided (parked ones again when released or given up).
        decided = sum(in_stats[o] for o in ("applied", "duplicate", "skipped", "dead_lettered", "parked"))
        assert decided >= len(records)
        dead = sum(1 for topic in (f"{TOPIC}.dlq", f"{LEDGER}.dlq") for _ in cluster.records(topic))
        assert dead == in_stats["dead_lettered"]
    finally:
        app.engine.dispose()


def test_a_rolled_back_book_counts_nowhere(tmp_path: Path) -> None:
    app = App("g", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path}/t.db", outbox=False)
    migrate.upgrade(app.engine)

    @app.handler(TOPIC)
    def handle(message: Message, session: Any) -> None:
        pass

    books = Bookkeeper(app.engine, "g", app.stats, app.metrics)
    message = Message(topic=TOPIC, partition=0, offset=7, key=None, value=b"v")
    with pytest.raises(RuntimeError), books.transaction(app.handlers[TOPIC]) as (_, book):
        book.add(message, Outcome.APPLIED, "m")
        raise RuntimeError("rolled back")
    with books.transaction(app.handlers[TOPIC]) as (_, book):
        book.add(message, Outcome.DUPLICATE, "m")
    with app.engine.connect() as conn:
        row = conn.execute(sa.select(counters.c.applied, counters.c.duplicates, counters.c.last_offset)).one()
    assert tuple(row) == (0, 1, 7)
    assert app.stats == {"duplicate": 1}
    app.engine.dispose()
