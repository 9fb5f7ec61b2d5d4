"""TLS end to end: producer, consumer, dead letters and the outbox relay over a verified TLS connection.

The broker here is a separate broker (Apache Kafka, or tansu when the suite
runs on tansu; ``tests/services/brokers.py``) whose advertised address is a
TLS-terminating proxy (``tests/tlsproxy.py``) with a certificate from a
throwaway CA: every connection a client makes goes through TLS, and a client
that does not trust the CA cannot connect at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from exactlyonce import ConfigurationError, Producer, migrate
from exactlyonce.embedded import free_port
from exactlyonce.errors import TransientError
from tests.conftest import unavailable
from tests.services.brokers import BrokerUnavailable, private_broker
from tests.tlsproxy import TlsProxy

from . import secured
from .helpers import (
    CONFLUENT_CONSUMER_CONFIG,
    CONSUMER_CONFIG,
    create_effects,
    effect_counts,
    engine_for,
    process,
    unique,
    wait_until,
)

SIGNING_KEY = ("tls", b"tls-test-secret-0123456789")
# Fail fast: kafka-python waits bootstrap_timeout_ms (30 s by default) before
# giving up on a broker it cannot talk to.
FAST_FAIL = {"bootstrap_timeout_ms": 3000}


@dataclass(frozen=True)
class TlsBroker:
    address: str
    cafile: str
    #: A CA that did not sign the broker's certificate.
    other_cafile: str
    proxy: TlsProxy
    ca: trustme.CA
    #: The plaintext port behind the proxy (only the proxy connects to it).
    broker_port: int

    @property
    def config(self) -> dict[str, Any]:
        """The client settings for this broker, certificate and host name verified."""
        return {"security_protocol": "SSL", "ssl_cafile": self.cafile, "ssl_check_hostname": True}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """An embedded broker reachable only through TLS, with a certificate for 127.0.0.1 and localhost."""
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    cafile, other_cafile = directory / "ca.pem", directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    other_ca.cert_pem.write_to_path(str(other_cafile))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    broker_port, proxy_port = free_port(), free_port()
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(private_broker(broker_port, advertised_port=proxy_port))
    except BrokerUnavailable as exc:
        unavailable(f"no broker for the TLS proxy: {exc}")
    with stack, TlsProxy(broker_port, server, port=proxy_port) as proxy:
        yield TlsBroker(proxy.address, str(cafile), str(other_cafile), proxy, ca, broker_port)


def _no_refusal_since(tls_broker: TlsBroker, refused_before: int) -> None:
    """No handshake refused since ``refused_before`` was read.

    A ClientHello is counted when it arrives, the connection when its handshake
    completes: the handshakes still under way (a client reconnecting as the run
    ends) are given time to finish.
    """
    wait_until(lambda: tls_broker.proxy.refused == refused_before, 5.0, "no refused handshake")


def test_effectively_once_over_verified_tls(tls_broker: TlsBroker, postgres_url: str) -> None:
    """Producer -> App (handler, duplicate, dead letter, outbox relay) all over TLS with verification on."""
    from tests.conftest import drop_all_tables

    drop_all_tables(postgres_url)
    handshakes_before, refused_before = tls_broker.proxy.connections, tls_broker.proxy.refused
    secured.effectively_once(tls_broker.address, tls_broker.config, postgres_url, SIGNING_KEY, "tls")
    # Everything went through the TLS proxy, and every handshake there succeeded.
    assert tls_broker.proxy.connections > handshakes_before
    _no_refusal_since(tls_broker, refused_before)


def test_effectively_once_over_verified_tls_with_the_confluent_client(tls_broker: TlsBroker, postgres_url: str) -> None:
    """The same with the worker's consumer on confluent-kafka: librdkafka's TLS settings, verified."""
    from tests.conftest import drop_all_tables

    if importlib.util.find_spec("confluent_kafka") is None:
        unavailable("confluent-kafka is not installed (pip install 'exactlyonce[confluent]')")
    drop_all_tables(postgres_url)
    handshakes_before, refused_before = tls_broker.proxy.connections, tls_broker.proxy.refused
    librdkafka = {**CONFLUENT_CONSUMER_CONFIG, "security.protocol": "SSL", "ssl.ca.location": tls_broker.cafile,
                  "ssl.endpoint.identification.algorithm": "https"}
    secured.effectively_once(tls_broker.address, tls_broker.config, postgres_url, SIGNING_KEY, "tls-c",
                             consumer_config=librdkafka, kafka_client="confluent")
    assert tls_broker.proxy.connections > handshakes_before
    _no_refusal_since(tls_broker, refused_before)


def test_the_confluent_client_that_does_not_trust_the_certificate_does_not_consume(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """librdkafka trusting another CA: the worker stops at once with the certificate error, nothing consumed."""
    if importlib.util.find_spec("confluent_kafka") is None:
        unavailable("confluent-kafka is not installed (pip install 'exactlyonce[confluent]')")
    refused_before = tls_broker.proxy.refused
    secured.refused_at_start(
        tls_broker.address, f"sqlite:///{tmp_path / 'app.db'}", r"certificate verify failed.*ssl\.ca\.location",
        kafka_client="confluent", consumer_config={**CONFLUENT_CONSUMER_CONFIG, "security.protocol": "SSL",
                                                   "ssl.ca.location": tls_broker.other_cafile})
    assert tls_broker.proxy.refused > refused_before, "the proxy saw the refused handshakes"


# The clear errors below need the bootstrap diagnosis in exactlyonce/_kafka/diagnosis.py
# (see the report of the TLS work): kafka-python 3 only times out.
@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_a_producer_that_does_not_trust_the_certificate_fails_clearly(tls_broker: TlsBroker, trust: str) -> None:
    """No trusted CA for the broker's certificate: a ConfigurationError naming the certificate failure."""
    config: dict[str, Any] = {"security_protocol": "SSL", **FAST_FAIL}
    if trust == "another CA":
        config["ssl_cafile"] = tls_broker.other_cafile
    refused_before = tls_broker.proxy.refused
    with pytest.raises(ConfigurationError) as caught:
        Producer(tls_broker.address, config=config)
    message = str(caught.value)
    assert f"TLS certificate verification failed for {tls_broker.address}" in message
    assert "unable to get local issuer certificate" in message
    assert "ssl_cafile" in message and "producer_config" in message
    assert tls_broker.proxy.refused > refused_before, "the proxy saw the refused handshakes"


def test_a_certificate_for_another_host_name_fails_clearly(tls_broker: TlsBroker) -> None:
    """The right CA, but a certificate for another name (ssl_check_hostname=True): a clear error too."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_broker.ca.issue_cert("kafka.example.com").configure_cert(server)
    with TlsProxy(tls_broker.broker_port, server) as other_name, \
            pytest.raises(ConfigurationError, match=r"TLS certificate verification failed.*IP address mismatch"):
        Producer(other_name.address, config={**tls_broker.config, **FAST_FAIL})


def test_an_app_that_does_not_trust_the_certificate_fails_clearly(tls_broker: TlsBroker, tmp_path: Path) -> None:
    """App.run() with a consumer_config trusting another CA stops with the certificate error."""
    untrusted = {"security_protocol": "SSL", "ssl_cafile": tls_broker.other_cafile, **FAST_FAIL}
    secured.refused_at_start(tls_broker.address, f"sqlite:///{tmp_path / 'app.db'}",
                             r"TLS certificate verification failed .*consumer_config",
                             consumer_config={**CONSUMER_CONFIG, **untrusted}, producer_config=untrusted)


def test_a_plaintext_client_on_the_tls_listener_gets_a_hint(tls_broker: TlsBroker) -> None:
    """Forgetting security_protocol: the error says which protocol was tried and suggests SSL."""
    with pytest.raises(TransientError, match=r"security_protocol='PLAINTEXT'.*set security_protocol='SSL'"):
        Producer(tls_broker.address, config=FAST_FAIL)


def test_the_standalone_relay_sends_over_verified_tls(tls_broker: TlsBroker, tmp_path: Path) -> None:
    """`exactlyonce relay --kafka-config ...` takes the TLS settings the App takes in producer_config."""
    secured.relay_command(tls_broker.address, tls_broker.config, f"sqlite:///{tmp_path / 'relay.db'}", "tls")


def test_exactlyonce_run_takes_the_connection_settings_on_the_command_line(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """`exactlyonce run --database-url --bootstrap-servers --kafka-config ...` over the App's own settings.

    The App's code points at a closed port and an unusable database, without
    TLS: the consumer, the dead-letter producer and the outbox relay work only
    if the command line's settings reach each of them.
    """
    address, config = tls_broker.address, tls_broker.config
    topic, out, group = unique("tls-run-in"), unique("tls-run-out"), unique("tls-run-group")
    for name in (topic, out, f"{topic}.dlq"):
        secured.create_topic(address, config, name)
    url = f"sqlite:///{tmp_path / 'run.db'}"
    engine = engine_for(url)
    migrate.upgrade(engine)
    create_effects(engine)
    with Producer(address, config=dict(config)) as producer:
        for message_id in ["r-1", "poison", "r-2"]:
            producer.send(topic, {"id": message_id}, message_id=message_id)
            producer.flush()

    argv = [sys.executable, "-m", "exactlyonce", "run", "tests.integration.cli_override_app:app",
            "--database-url", url, "--bootstrap-servers", address, *secured.kafka_config_options(config)]
    with process(argv, tmp_path / "run.log", EXACTLYONCE_TEST_TOPIC=topic, EXACTLYONCE_TEST_OUT=out,
                 EXACTLYONCE_TEST_GROUP=group) as worker:
        try:
            wait_until(lambda: secured.committed(address, config, group, topic) == 3, 60,
                       "the worker to commit all three records")
            relayed = secured.read(address, config, out, 2)
            (dead,) = secured.read(address, config, f"{topic}.dlq", 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log_tail()}") from None
        assert worker.terminate() == 0, worker.log_tail()
    assert effect_counts(engine) == {"r-1": 1, "r-2": 1}
    assert sorted(dict(r.headers)["message-id"] for r in relayed) == [b"done-r-1", b"done-r-2"]
    assert dict(dead.headers)["x-exactlyonce-reason"] == b"poison"
    engine.dispose()
