"""`exactlyonce run --metrics-port`: Prometheus metrics over HTTP from a real worker process, JSON log lines."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from exactlyonce.embedded import free_port

from .helpers import (
    create_effects,
    create_topic,
    engine_for,
    process,
    produce,
    rec,
    total_effects,
    unique,
    wait_until,
)

N = 12


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text format, or None when absent."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match[1])) == labels:
            return float(match[2])
    return None


def _scrape_when(port: int, scope: str, outcome: str, value: float) -> str | None:
    """The metrics text once the scope's count of ``outcome`` reached ``value``, else None."""
    text = _scrape(port)
    return text if _sample(text, "exactlyonce_messages_total", scope=scope, outcome=outcome) == value else None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_run_serves_metrics_and_logs_json(bootstrap_servers: str, database_url: str, tmp_path: Path) -> None:
    """The worker counts applied and duplicate records in exactlyonce_messages_total and logs one JSON object a line."""
    topic, group = unique("metrics"), unique("metrics-group")
    create_topic(bootstrap_servers, topic)
    engine = engine_for(database_url)
    create_effects(engine)
    # N distinct IDs, then two re-sends of the first one.
    produce(bootstrap_servers, topic, [rec(f"m-{i}") for i in range(N)] + [rec("m-0"), rec("m-0")])
    port = free_port()
    scope = f"{group}:{topic}"

    with process([sys.executable, "-m", "exactlyonce", "run", "tests.integration.cli_app:app",
                  "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", "--log-format", "json"],
                 tmp_path / "worker.log",
                 EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap_servers, EXACTLYONCE_DATABASE_URL=database_url,
                 EXACTLYONCE_TEST_TOPIC=topic, EXACTLYONCE_TEST_GROUP=group) as worker:
        try:
            wait_until(lambda: total_effects(engine) >= N, 60, f"{N} effects")
            text = wait_until(lambda: _scrape_when(port, scope, "duplicate", 2), 30, "the duplicates to be counted")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log_tail()}") from None
        assert _sample(text, "exactlyonce_messages_total", scope=scope, outcome="applied") == N
        assert _sample(text, "exactlyonce_handler_seconds_count", scope=scope) is not None
        assert worker.terminate() == 0, worker.log_tail()

    lines = [line for line in worker.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"] == "exactlyonce.cli" and "serving metrics" in e["message"] for e in entries)
    engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_run_with_a_taken_metrics_port_fails_with_one_line(bootstrap_servers: str, database_url: str,
                                                           tmp_path: Path) -> None:
    """A port already in use ends `run` at once: exit 2, the reason on one line, nothing consumed."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with process([sys.executable, "-m", "exactlyonce", "run", "tests.integration.cli_app:app",
                      "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"], tmp_path / "worker.log",
                     EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap_servers, EXACTLYONCE_DATABASE_URL=database_url,
                     EXACTLYONCE_TEST_TOPIC=unique("unused")) as worker:
            assert worker.wait(60) == 2
            output = worker.log_tail()
    assert f"exactlyonce: error: cannot serve metrics on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
