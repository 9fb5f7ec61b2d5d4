"""The runner's in-memory bookkeeping stays bounded however long it runs."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

from exactlyonce import App, DeadLetter, Message
from exactlyonce.runtime import Runner
from exactlyonce.runtime.booking import MAX_REASONS
from exactlyonce.storage import sequence as seq


def _runner(tmp_path: Any) -> tuple[App, Runner]:
    app = App("g", bootstrap_servers="127.0.0.1:1", database_url=f"sqlite:///{tmp_path}/t.db")

    @app.handler("t")
    def handle(message: Message, session: Any) -> None:
        pass

    return app, Runner(app, threading.Event())


def test_free_text_dead_letter_reasons_are_counted_in_at_most_max_reasons_keys(tmp_path: Any) -> None:
    """A handler's own DeadLetter reasons (free text) cannot grow stats without bound; the rest count as other."""
    app, runner = _runner(tmp_path)
    handler = app.handlers["t"]
    message = Message(topic="t", partition=0, offset=0, key=None, value=b"v")
    for n in range(MAX_REASONS + 30):
        runner._books._dead_lettered(handler, message, DeadLetter(f"custom-{n}"))
    keys = [key for key in runner.stats if key.startswith("dead_lettered:")]
    assert len(keys) == MAX_REASONS + 1
    assert runner.stats["dead_lettered:other"] == 30
    app.engine.dispose()


def test_reported_gaps_keep_only_the_open_ones(tmp_path: Any, monkeypatch: Any) -> None:
    """Each open gap is logged once; once closed it is forgotten, so the set is as small as the open gaps."""
    app, runner = _runner(tmp_path)
    handler = app.handlers["t"]
    since = datetime(2026, 1, 1)
    open_gaps: list[seq.Stream] = []
    monkeypatch.setattr(seq, "overdue", lambda session, scope, cutoff, **kw: list(open_gaps))
    for n in range(100):
        open_gaps[:] = [seq.Stream(f"s{n}", 1, 1, since + timedelta(seconds=n))]
        runner._ordered.handle_gaps(handler)
        runner._ordered.handle_gaps(handler)
    assert runner._ordered._reported_gaps == {(handler.scope, "s99", since + timedelta(seconds=99))}
    open_gaps[:] = []
    runner._ordered.handle_gaps(handler)
    assert runner._ordered._reported_gaps == set()
    app.engine.dispose()
