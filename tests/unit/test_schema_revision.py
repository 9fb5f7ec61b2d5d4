"""A database a revision behind the code is refused with what to do, before anything is written."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from exactlyonce import App, ConfigurationError, Message
from exactlyonce.runtime import Runner
from exactlyonce.storage import migrate
from exactlyonce.storage.schema import counters, processed
from exactlyonce.testing import Cluster


def test_a_missing_column_is_named_with_the_command_that_adds_it(tmp_path: Path) -> None:
    app = App("g", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path}/t.db", outbox=False)
    migrate.upgrade(app.engine, "0005")  # before exactlyonce_counters.fingerprint_mismatches

    @app.handler("t")
    def handle(message: Message, session: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"exactlyonce_counters\.fingerprint_mismatches missing.*db upgrade"):
        migrate.require_tables(app.engine, processed, counters)
    cluster = Cluster()
    runner = Runner(app, threading.Event(), consumer_factory=cluster.consumer_factory(),
                    producer_factory=cluster.producer_factory())
    with pytest.raises(ConfigurationError, match="fingerprint_mismatches"):
        runner.run()
    assert cluster.members == []  # refused before it joined the group
    migrate.upgrade(app.engine)
    migrate.require_tables(app.engine, processed, counters)
    app.engine.dispose()
