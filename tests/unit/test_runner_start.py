"""A worker that starts while the broker does not answer yet waits for it (a cluster restarting), for its
transient retry budget but at least STARTUP_PATIENCE (one bootstrap attempt alone can take 30 s); a
configuration error still ends it at once."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from exactlyonce import App, ConfigurationError, Message, TransientError
from exactlyonce._kafka import TopicPartition
from exactlyonce.runtime import Runner
from exactlyonce.storage import migrate
from exactlyonce.testing import Cluster, FastStop, TwinConsumer


def _app(tmp_path: Path) -> App:
    app = App("start", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path}/t.db", outbox=False,
              transient_retry_budget=timedelta(0))  # the start waits at least STARTUP_PATIENCE anyway
    migrate.upgrade(app.engine)

    @app.handler("t")
    def handle(message: Message, session: Any) -> None:
        pass

    return app


def test_a_broker_that_answers_late_is_waited_for(tmp_path: Path) -> None:
    app = _app(tmp_path)
    cluster = Cluster()
    cluster.append("t", 0, value=b"v", headers=[("message-id", b"m1")])
    stop = FastStop()
    attempts: list[int] = []

    def late(**kwargs: Any) -> TwinConsumer:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("no Kafka broker answers at twin:9092")
        return TwinConsumer(cluster=cluster, **kwargs)

    def before_poll(member: TwinConsumer) -> bool:
        if member.fake.positions and all(
                member.fake.positions[tp] >= cluster.end_offset(tp) for tp in member.fake.assigned):
            stop.set()
            return True
        return False

    cluster.before_poll = before_poll
    Runner(app, stop, consumer_factory=late, producer_factory=cluster.producer_factory()).run()
    assert len(attempts) == 3
    assert app.stats["applied"] == 1
    app.engine.dispose()


def test_a_configuration_error_at_the_start_is_not_retried(tmp_path: Path) -> None:
    app = _app(tmp_path)
    attempts: list[int] = []

    def refused(**kwargs: Any) -> TwinConsumer:
        attempts.append(1)
        raise ConfigurationError("SASL authentication failed")

    with pytest.raises(ConfigurationError):
        Runner(app, threading.Event(), consumer_factory=refused).run()
    assert attempts == [1]
    app.engine.dispose()


def test_a_rewind_that_cannot_seek_reopens_the_consumer_at_the_committed_offsets(tmp_path: Path) -> None:
    """A transient failure rewinds the partition; when the seek itself fails, polling on would skip the
    record: the worker starts a new consumer instead, which reads on from the committed offsets."""
    app = App("rewind", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path}/t.db", outbox=False,
              transient_retry_budget=timedelta(0))
    migrate.upgrade(app.engine)
    calls: list[str] = []

    @app.handler("t", batch_size=1)
    def handle(message: Message, session: Any) -> None:
        calls.append(message.value.decode())
        if message.value == b"v1" and calls.count("v1") == 1:
            raise TransientError("the database went away")

    cluster = Cluster()
    for n in range(3):
        cluster.append("t", 0, value=f"v{n}".encode(), headers=[("message-id", f"m{n}".encode())])
    stop = FastStop()
    members: list[TwinConsumer] = []

    def factory(**kwargs: Any) -> TwinConsumer:
        member = TwinConsumer(cluster=cluster, **kwargs)
        if not members:
            def broken_seek(tp: Any, offset: int) -> None:
                raise ValueError("Unassigned partition")
            member.fake.seek = broken_seek  # type: ignore[method-assign]
        members.append(member)
        return member

    def before_poll(member: TwinConsumer) -> bool:
        if app.stats["applied"] == 3:
            stop.set()
            return True
        return False

    cluster.before_poll = before_poll
    Runner(app, stop, consumer_factory=factory, producer_factory=cluster.producer_factory()).run()
    assert len(members) == 2
    assert calls == ["v0", "v1", "v1", "v2"]
    assert app.stats["applied"] == 3
    assert cluster.committed_offset("rewind", TopicPartition("t", 0)) == 3
    app.engine.dispose()
