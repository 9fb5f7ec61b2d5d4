"""TLS and SASL against Apache Kafka's own listeners, not a proxy.

One single-node Apache Kafka per security mode, started once for the module
(``tests/services/kafka.py``'s :class:`ClientListener`), whose client-facing
listener is ``SSL`` (a server certificate from a throwaway ``trustme`` CA),
``SASL_PLAINTEXT`` or ``SASL_SSL`` (users for ``PLAIN`` and
``SCRAM-SHA-256``). On each: a signed Producer, an App that applies, skips a
duplicate and dead-letters a bad record (its dead-letter producer and outbox
relay configured through ``producer_config``), the standalone ``relay`` and
``status`` commands with ``--kafka-config``, and the clear errors for a
client that does not trust the CA, a wrong password, a mechanism the broker
does not enable and a client that does not speak SASL. The App's scenario
and the wrong password run with the confluent client too.

Apache Kafka only: tansu has no TLS or SASL listener.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from exactlyonce import ConfigurationError, Producer
from tests.conftest import drop_all_tables, unavailable
from tests.services.brokers import private_kind

from . import secured
from .helpers import CONFLUENT_CONSUMER_CONFIG, CONSUMER_CONFIG, unique

SIGNING_KEY = ("kafka-security", b"kafka-security-secret-0123456789")
USER, PASSWORD = "alice", "alice-secret"
WRONG_PASSWORD = "not-alices-password"
# Fail fast: kafka-python waits bootstrap_timeout_ms (30 s by default) before
# giving up on a broker it cannot talk to.
FAST_FAIL = {"bootstrap_timeout_ms": 3000}

TLS_MODES = ["SSL", "SASL_SSL"]
SASL_MODES = ["SASL_PLAINTEXT", "SASL_SSL"]
ALL_MODES = ["SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, the broker's certificate from it, and another CA that signed nothing of ours."""

    cafile: str
    other_cafile: str
    #: The broker's PEM keystore: PKCS#8 private key, then the certificate chain.
    keystore: Path


@dataclass(frozen=True)
class SecuredBroker:
    protocol: str
    address: str
    pki: Pki
    log_path: Path
    #: The client settings that work here (for SASL: PLAIN as alice).
    config: dict[str, Any] = field(default_factory=dict)

    def with_(self, **settings: Any) -> dict[str, Any]:
        """The working settings with some replaced."""
        return {**self.config, **settings}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("kafka-pki")
    # Kafka's PEM keystore wants an unencrypted PKCS#8 key; trustme's default
    # key is EC in SEC1 form. An RSA key, rewritten as PKCS#8, is what was tried.
    ca, other_ca = trustme.CA(key_type=trustme.KeyType.RSA), trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    keystore = directory / "broker.pem"
    keystore.write_bytes(pkcs8 + b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cafile, other_cafile = directory / "ca.pem", directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    other_ca.cert_pem.write_to_path(str(other_cafile))
    return Pki(str(cafile), str(other_cafile), keystore)


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest, pki: Pki) -> Iterator[SecuredBroker]:
    """A single Apache Kafka node whose client listener speaks ``request.param`` (a security protocol)."""
    if private_kind() == "tansu":
        pytest.skip("Apache Kafka only: tansu has no TLS or SASL listener")
    from tests.services.kafka import ClientListener, KafkaCluster, KafkaUnavailable

    protocol: str = request.param
    listener = ClientListener(protocol, keystore=pki.keystore if protocol in TLS_MODES else None,
                              users={USER: PASSWORD} if protocol in SASL_MODES else {},
                              mechanisms=("PLAIN", "SCRAM-SHA-256"))
    cluster = KafkaCluster(1, client_listener=listener)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(cluster)
    except KafkaUnavailable as exc:
        unavailable(f"no Apache Kafka with a {protocol} listener: {exc}")
    config: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_MODES:
        config.update(ssl_cafile=pki.cafile, ssl_check_hostname=True)
    if protocol in SASL_MODES:
        config.update(sasl_mechanism="PLAIN", sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    with stack:
        yield SecuredBroker(protocol, cluster.bootstrap_servers, pki, cluster.node(1).log_path, config)


def modes(*protocols: str) -> pytest.MarkDecorator:
    """Run a test on the brokers of these security protocols (one module-scoped broker each)."""
    return pytest.mark.parametrize("broker", list(protocols), indirect=True, scope="module")


# -- what works ---------------------------------------------------------------


@modes(*ALL_MODES)
def test_effectively_once_and_status(broker: SecuredBroker, postgres_url: str) -> None:
    """Signed Producer -> App (applied, duplicate, dead letter, outbox relay) -> `exactlyonce status`, all secured."""
    drop_all_tables(postgres_url)
    scenario = secured.effectively_once(broker.address, broker.config, postgres_url, SIGNING_KEY,
                                        broker.protocol.lower().replace("_", "-"))
    data = secured.status_command(broker.address, broker.config, scenario)
    assert data["lag_error"] is None
    (scope,) = data["scopes"]
    assert scope["group_id"] == scenario.group_id
    assert (scope["applied"], scope["duplicates"], scope["dead_lettered"]) == (3, 1, 1)
    (partition,) = scope["partitions"]
    assert (partition["committed"], partition["end_offset"], partition["lag"]) == (5, 5, 0)

    # The same command with settings the broker refuses still shows the
    # counts, and says why the lag is unknown.
    refused = (broker.with_(sasl_plain_password=WRONG_PASSWORD) if broker.protocol in SASL_MODES
               else broker.with_(ssl_cafile=broker.pki.other_cafile))
    data = secured.status_command(broker.address, refused, scenario)
    (scope,) = data["scopes"]
    assert scope["applied"] == 3 and scope["lag"] is None
    expected = "SASL authentication failed" if broker.protocol in SASL_MODES else "TLS certificate verification failed"
    assert expected in data["lag_error"] and "--kafka-config" in data["lag_error"]
    assert WRONG_PASSWORD not in data["lag_error"]


@modes(*ALL_MODES)
def test_the_standalone_relay_command(broker: SecuredBroker, tmp_path: Path) -> None:
    """`exactlyonce relay --kafka-config ...` takes the settings the App takes in producer_config."""
    secured.relay_command(broker.address, broker.config, f"sqlite:///{tmp_path / 'relay.db'}",
                          broker.protocol.lower())


@modes(*SASL_MODES)
def test_scram_sha_256(broker: SecuredBroker) -> None:
    """A SCRAM-SHA-256 user (created when the broker's storage was formatted) produces and reads."""
    scram = broker.with_(sasl_mechanism="SCRAM-SHA-256")
    topic = unique("scram")
    secured.create_topic(broker.address, scram, topic)
    with Producer(broker.address, config=scram, signing_key=SIGNING_KEY) as producer:
        producer.send(topic, {"n": 1}, message_id="scram-1")
        producer.flush()
    (record,) = secured.read(broker.address, scram, topic, 1)
    assert dict(record.headers)["message-id"] == b"scram-1"


#: kafka-python's names for the settings above, and librdkafka's (``kafka_client="confluent"``).
_LIBRDKAFKA_NAMES = {"security_protocol": "security.protocol", "ssl_cafile": "ssl.ca.location",
                     "sasl_mechanism": "sasl.mechanisms", "sasl_plain_username": "sasl.username",
                     "sasl_plain_password": "sasl.password"}


def librdkafka(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` for the confluent client's consumer_config, host names verified as with kafka-python."""
    settings = {_LIBRDKAFKA_NAMES[key]: value for key, value in config.items() if key in _LIBRDKAFKA_NAMES}
    if "ssl.ca.location" in settings:
        settings["ssl.endpoint.identification.algorithm"] = "https"
    return {**CONFLUENT_CONSUMER_CONFIG, **settings}


@modes(*ALL_MODES)
def test_the_confluent_client_applies_once(broker: SecuredBroker, postgres_url: str) -> None:
    """The same scenario with the worker's consumer on confluent-kafka, configured in librdkafka's names."""
    drop_all_tables(postgres_url)
    secured.effectively_once(broker.address, broker.config, postgres_url, SIGNING_KEY,
                             "c-" + broker.protocol.lower().replace("_", "-"),
                             consumer_config=librdkafka(broker.config), kafka_client="confluent")


# -- clear errors ---------------------------------------------------------------


@modes(*SASL_MODES)
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_a_wrong_password_fails_clearly(broker: SecuredBroker, mechanism: str) -> None:
    """A password the broker refuses: a ConfigurationError naming the authentication failure, not a timeout."""
    config = broker.with_(sasl_mechanism=mechanism, sasl_plain_password=WRONG_PASSWORD, **FAST_FAIL)
    with pytest.raises(ConfigurationError) as caught:
        Producer(broker.address, config=config)
    message = str(caught.value)
    assert f"SASL authentication failed at {broker.address} (mechanism {mechanism}, user 'alice')" in message
    assert "invalid" in message.lower() and "producer_config" in message
    assert WRONG_PASSWORD not in message
    # What the broker logged, for comparison with what the client was told.
    assert "Failed authentication with /127.0.0.1" in broker.log_path.read_text(errors="replace")


@modes(*SASL_MODES)
def test_an_app_with_a_wrong_password_fails_clearly(broker: SecuredBroker, tmp_path: Path) -> None:
    """App.run() whose consumer_config has a wrong password stops with the authentication error."""
    refused = broker.with_(sasl_plain_password=WRONG_PASSWORD, **FAST_FAIL)
    secured.refused_at_start(broker.address, f"sqlite:///{tmp_path / 'app.db'}",
                             r"SASL authentication failed .*Check consumer_config",
                             consumer_config={**CONSUMER_CONFIG, **refused}, producer_config=refused)


@modes(*SASL_MODES)
def test_the_confluent_client_with_a_wrong_password_fails_clearly(broker: SecuredBroker, tmp_path: Path) -> None:
    """The confluent client refused by the broker: a ConfigurationError at start quoting librdkafka, no password."""
    error = secured.refused_at_start(broker.address, f"sqlite:///{tmp_path / 'app.db'}",
                                     r"Authentication failed.*consumer_config", kafka_client="confluent",
                                     consumer_config=librdkafka(broker.with_(sasl_plain_password=WRONG_PASSWORD)))
    assert WRONG_PASSWORD not in str(error)


@modes(*SASL_MODES)
def test_a_mechanism_the_broker_does_not_enable_fails_clearly(broker: SecuredBroker) -> None:
    """SCRAM-SHA-512 against a broker enabling PLAIN and SCRAM-SHA-256: the error lists what it enables."""
    with pytest.raises(ConfigurationError, match=r"does not enable SASL mechanism 'SCRAM-SHA-512' "
                                                 r"\(it enables: PLAIN, SCRAM-SHA-256\)"):
        Producer(broker.address, config=broker.with_(sasl_mechanism="SCRAM-SHA-512", **FAST_FAIL))


@modes(*SASL_MODES)
def test_a_client_without_sasl_is_told_the_listener_requires_it(broker: SecuredBroker) -> None:
    """security_protocol PLAINTEXT (or SSL) on a SASL listener: the error names the protocol to set."""
    without_sasl = "SSL" if broker.protocol == "SASL_SSL" else "PLAINTEXT"
    config = {k: v for k, v in broker.config.items() if not k.startswith("sasl_")}
    config.update(security_protocol=without_sasl, **FAST_FAIL)
    with pytest.raises(ConfigurationError) as caught:
        Producer(broker.address, config=config)
    assert (f"requires SASL authentication (mechanisms: PLAIN, SCRAM-SHA-256) but security_protocol="
            f"{without_sasl!r}: set security_protocol={broker.protocol!r}") in str(caught.value)


@modes(*TLS_MODES)
@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_a_client_that_does_not_trust_the_ca_fails_clearly(broker: SecuredBroker, trust: str) -> None:
    """Kafka's own TLS listener, a CA the client does not trust: the certificate error, as through the proxy."""
    config = {k: v for k, v in broker.config.items() if k != "ssl_cafile"}
    if trust == "another CA":
        config["ssl_cafile"] = broker.pki.other_cafile
    with pytest.raises(ConfigurationError) as caught:
        Producer(broker.address, config={**config, **FAST_FAIL})
    message = str(caught.value)
    assert f"TLS certificate verification failed for {broker.address}" in message
    assert "unable to get local issuer certificate" in message
    assert "ssl_cafile" in message and "producer_config" in message
