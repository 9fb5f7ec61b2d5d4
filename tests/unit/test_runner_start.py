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
