"""Prometheus metrics for one App.

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
instead of using the process-global default one: tests (and some services) run
several Apps in one process, and registering the same metric name twice in the
global registry raises. One registry per App also means ``/metrics`` shows only
that App's series.

The counters here are process-local and reset on restart, as Prometheus
counters are meant to; the exact, durable per-scope totals live in the
``exactlyonce_counters`` table (see ``exactlyonce status``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import ConfigurationError
from .outcome import Outcome

__all__ = ["OUTCOMES", "RETRY_KINDS", "Metrics"]

#: The values of the ``outcome`` label of ``exactlyonce_messages_total``.
OUTCOMES = tuple(str(outcome) for outcome in Outcome)

#: The values of the ``kind`` label of ``exactlyonce_retries_total``.
RETRY_KINDS = ("handler", "transient")

# Handler transactions range from sub-millisecond (SQLite, a dedup hit) to
# seconds (a slow handler, lock waits); the default buckets start at 5 ms and
# would lump all fast transactions into one bucket.
_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics one App exports, on a registry of its own.

    The methods are thin and thread-safe (prometheus_client's metric objects
    lock internally), so the runner and the relay thread may call them
    concurrently without coordinating.
    """

    registry: CollectorRegistry

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._messages = Counter(
            "exactlyonce_messages",
            "Records decided by a handler scope, by outcome.",
            ["scope", "outcome"],
            registry=self.registry,
        )
        self._handler_seconds = Histogram(
            "exactlyonce_handler_seconds",
            "Duration of one handler transaction (claim, handler, commit), in seconds.",
            ["scope"],
            buckets=_HANDLER_BUCKETS,
            registry=self.registry,
        )
        self._retries = Counter(
            "exactlyonce_retries",
            "Retries of a handler transaction: kind=handler (the handler raised) or transient (database/broker).",
            ["scope", "kind"],
            registry=self.registry,
        )
        self._consumer_lag = Gauge(
            "exactlyonce_consumer_lag",
            "Records between the consumer's position and the partition's end offset.",
            ["topic", "partition"],
            registry=self.registry,
        )
        self._outbox_backlog = Gauge(
            "exactlyonce_outbox_backlog",
            "Outbox rows not yet published by the relay.",
            registry=self.registry,
        )
        self._outbox_refused = Gauge(
            "exactlyonce_outbox_refused",
            "Outbox rows the broker refused for good, waiting for an operator (exactlyonce outbox release).",
            registry=self.registry,
        )
        self._open_gaps = Gauge(
            "exactlyonce_sequence_open_gaps",
            "Sequenced streams of a scope currently waiting for a missing sequence number.",
            ["scope"],
            registry=self.registry,
        )
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def outcome(self, scope: str, outcome: str, count: int = 1) -> None:
        """Count ``count`` records of ``scope`` that ended with ``outcome`` (one of :data:`OUTCOMES`)."""
        self._messages.labels(scope=scope, outcome=outcome).inc(count)

    def handler_seconds(self, scope: str, seconds: float) -> None:
        """Record the duration of one handler call of ``scope`` (a batch handler's call counts once)."""
        self._handler_seconds.labels(scope=scope).observe(seconds)

    def retry(self, scope: str, kind: str) -> None:
        """Count one retry of ``scope``; ``kind`` is ``"handler"`` or ``"transient"``."""
        self._retries.labels(scope=scope, kind=kind).inc()

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        """Set the lag of one assigned partition (a gauge: the latest observation wins)."""
        self._consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the lag series of a partition this worker no longer holds (its new owner reports it)."""
        with contextlib.suppress(KeyError):
            self._consumer_lag.remove(topic, str(partition))

    def outbox_backlog(self, pending: int) -> None:
        """Set the number of outbox rows waiting for the relay."""
        self._outbox_backlog.set(pending)

    def outbox_refused(self, count: int) -> None:
        """Set the number of outbox rows the broker refused (each holds back the later rows of its key)."""
        self._outbox_refused.set(count)

    def open_gaps(self, scope: str, count: int) -> None:
        """Set the number of sequenced streams of ``scope`` that wait for a gap to fill."""
        self._open_gaps.labels(scope=scope).set(count)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve this registry at ``http://addr:port/metrics`` from a daemon thread.

        A taken port is a configuration mistake (two workers on one host, a
        stale process), so it becomes a :class:`ConfigurationError` naming
        the port rather than an ``OSError`` deep in ``socketserver``.
        Port 0 picks a free port; :attr:`port` tells which one.
        """
        if self._server is not None:
            raise ConfigurationError(f"metrics are already served on port {self.port}")
        try:
            result = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
        # prometheus_client >= 0.20 returns (server, thread); keep both to stop it later.
        self._server, self._server_thread = result

    @property
    def port(self) -> int | None:
        """The port :meth:`serve` listens on, or ``None`` when not serving."""
        if self._server is None:
            return None
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server started by :meth:`serve`, if any (tests start many)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            self._server_thread = None
