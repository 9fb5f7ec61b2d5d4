"""metrics.Metrics: a registry per instance, the documented series, serve() errors."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import generate_latest

from exactlyonce import ConfigurationError
from exactlyonce.metrics import Metrics


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_series_and_separate_registries() -> None:
    """Two instances never share a series (several Apps per process)."""
    a, b = Metrics(), Metrics()
    a.outcome("s", "applied", 3)
    a.outcome("s", "duplicate")
    a.handler_seconds("s", 0.002)
    a.retry("s", "transient")
    a.consumer_lag("t", 1, 7)
    a.consumer_lag("t", 1, 4)
    a.outbox_backlog(5)
    a.outbox_refused(1)
    a.open_gaps("s", 2)
    assert _value(a, "exactlyonce_messages_total", scope="s", outcome="applied") == 3
    assert _value(a, "exactlyonce_messages_total", scope="s", outcome="duplicate") == 1
    assert _value(a, "exactlyonce_handler_seconds_count", scope="s") == 1
    assert _value(a, "exactlyonce_retries_total", scope="s", kind="transient") == 1
    assert _value(a, "exactlyonce_consumer_lag", topic="t", partition="1") == 4
    assert _value(a, "exactlyonce_outbox_backlog") == 5
    assert _value(a, "exactlyonce_outbox_refused") == 1
    assert _value(a, "exactlyonce_sequence_open_gaps", scope="s") == 2
    assert _value(b, "exactlyonce_messages_total", scope="s", outcome="applied") is None
    assert b'scope="s"' not in generate_latest(b.registry)


def test_serve_exposes_the_registry_and_refuses_a_taken_port() -> None:
    metrics = Metrics()
    metrics.outcome("s", "applied")
    metrics.serve(0, "127.0.0.1")
    try:
        assert metrics.port
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'exactlyonce_messages_total{outcome="applied",scope="s"} 1.0' in body
        with pytest.raises(ConfigurationError, match="already served"):
            metrics.serve(0, "127.0.0.1")
    finally:
        metrics.close()
    assert metrics.port is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{taken.getsockname()[1]}"):
            Metrics().serve(taken.getsockname()[1], "127.0.0.1")


def test_a_revoked_partition_loses_its_lag_series() -> None:
    """forget_partition drops the series (its new owner reports the lag); forgetting twice is harmless."""
    metrics = Metrics()
    metrics.consumer_lag("t", 0, 3)
    metrics.consumer_lag("t", 1, 5)
    metrics.forget_partition("t", 0)
    metrics.forget_partition("t", 0)
    assert _value(metrics, "exactlyonce_consumer_lag", topic="t", partition="0") is None
    assert _value(metrics, "exactlyonce_consumer_lag", topic="t", partition="1") == 5
