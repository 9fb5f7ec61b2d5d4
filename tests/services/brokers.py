"""Which Kafka broker the tests run on, and brokers of their own for tests that need one.

``$EXACTLYONCE_TEST_BROKER`` chooses:

- ``kafka``: Apache Kafka (the version in ``tests/services/pom.xml``) from
  Maven Central, started by the test session in KRaft mode. The default when
  no Docker engine answers; what CI runs on.
- ``tansu``: the embedded broker (``exactlyonce.EmbeddedBroker``): no Java,
  memory only. CI runs a smoke set on it.
- ``docker``: a testcontainers Kafka. The default when a Docker engine answers.

``$EXACTLYONCE_TEST_BOOTSTRAP_SERVERS`` overrides all three for the shared
broker (tests that start a broker of their own still start ``kafka`` or
``tansu``). A chosen broker that cannot start fails the tests that need it
under ``CI=true`` (skips them elsewhere) with the reason; there is no silent
fallback from one broker to another.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

KIND_ENV = "EXACTLYONCE_TEST_BROKER"
KINDS = ("kafka", "tansu", "docker")


class BrokerUnavailable(RuntimeError):
    """The selected broker cannot start here; the message says why in one line."""


@functools.cache
def selected_kind() -> str:
    """The broker kind for this test session (see the module docstring)."""
    kind = os.environ.get(KIND_ENV, "").strip().lower()
    if kind:
        if kind not in KINDS:
            raise BrokerUnavailable(f"{KIND_ENV}={kind!r}: choose one of {', '.join(KINDS)}")
        return kind
    from tests.conftest import docker_available

    return "docker" if docker_available() else "kafka"


def private_kind() -> str:
    """The kind for a broker a test starts for itself (a testcontainers broker cannot sit behind our proxies)."""
    return "tansu" if selected_kind() == "tansu" else "kafka"


@contextlib.contextmanager
def private_broker(port: int | None = None, *, advertised_port: int | None = None) -> Iterator[str]:
    """A single broker of this test's own on ``port``, telling clients ``advertised_port``.

    Yields the bootstrap servers (the advertised address, where a test puts a
    fault-injecting or TLS proxy). The broker is stopped on exit.
    """
    if private_kind() == "tansu":
        from exactlyonce import ConfigurationError, EmbeddedBroker

        try:
            broker = EmbeddedBroker(port, advertised_port=advertised_port).start()
        except ConfigurationError as exc:
            raise BrokerUnavailable(f"no embedded broker: {exc}") from exc
        try:
            yield broker.bootstrap_servers
        finally:
            broker.stop()
        return
    from tests.services.kafka import KafkaCluster, KafkaUnavailable

    cluster = KafkaCluster(1, port=port, advertised_port=advertised_port)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        raise BrokerUnavailable(str(exc)) from exc
    try:
        yield cluster.bootstrap_servers
    finally:
        cluster.close()
