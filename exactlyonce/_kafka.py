"""The seam between the runtime and kafka-python (the consumer and producers).

Only this module and :mod:`exactlyonce.admin` (the operator commands'
group-less reads) import kafka-python.

Durations are ``timedelta`` everywhere else and become kafka-python's ``*_ms``
settings here; kafka-python's exceptions become exactlyonce's here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import kafka
import kafka.errors
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as _KafkaTopicPartition

from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError
from exactlyonce.message import Message

log = logging.getLogger("exactlyonce")

__all__ = ["Consumer", "RecordProducer", "RecordTooLarge", "TopicPartition", "is_collateral", "is_refusal",
           "is_retriable", "to_message"]

#: exactlyonce's consumer defaults; ``App(consumer_config=...)`` overrides them.
CONSUMER_DEFAULTS: dict[str, Any] = {
    # Offsets are committed by the runner, and only after the database commit.
    "enable_auto_commit": False,
    # A new group must see the records already in the topic, not only new ones.
    "auto_offset_reset": "earliest",
    # Skip records of aborted producer transactions.
    "isolation_level": "read_committed",
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 3_000,
    "max_poll_records": 500,
}

# Set by App itself; refused in consumer_config so there is one source of truth.
_OWNED_BY_APP = ("group_id", "bootstrap_servers")

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 0,
    # A dead letter is published inside an open database transaction: do not
    # block a minute (kafka-python's default) on metadata for a missing topic.
    "max_block_ms": 10_000,
}


class TopicPartition(NamedTuple):
    """A topic's partition (kafka-python's own stays behind this seam; the two compare equal)."""

    topic: str
    partition: int


def _theirs(tp: TopicPartition) -> Any:
    return _KafkaTopicPartition(tp.topic, tp.partition)


def _ours(partitions: Iterable[Any]) -> set[TopicPartition]:
    return {TopicPartition(tp.topic, tp.partition) for tp in partitions}


class RecordTooLarge(ConfigurationError):
    """The broker (or the producer's ``max_request_size``) refuses a record for its size."""


def to_message(record: Any) -> Message:
    """Turn a kafka-python ``ConsumerRecord`` into a :class:`Message`."""
    return Message(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=tuple((name, value or b"") for name, value in (record.headers or ())),
        timestamp_ms=record.timestamp,
    )


class Consumer:
    """A group consumer that commits only the offsets it is told to."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str,
        topics: Iterable[str],
        config: Mapping[str, Any],
        on_revoked: Callable[[set[TopicPartition], bool], None],
    ) -> None:
        for name in _OWNED_BY_APP:
            if name in config:
                raise ConfigurationError(f"set {name} on App, not in consumer_config")
        if config.get("enable_auto_commit"):
            # Auto-commit would commit offsets before the database commit: a
            # crash in between would lose the record.
            raise ConfigurationError("enable_auto_commit=True breaks the guarantee; leave it off")
        settings = {**CONSUMER_DEFAULTS, **config}
        try:
            self._consumer = kafka.KafkaConsumer(
                bootstrap_servers=bootstrap_servers, group_id=group_id, **settings
            )
        except kafka.errors.KafkaTimeoutError as exc:
            # kafka-python 3 raises this when bootstrap_timeout_ms passes without
            # a broker; the cause (a TLS failure, say) is only logged.
            raise bootstrap_failure(bootstrap_servers, settings, "consumer_config", exc) from exc
        except (TypeError, kafka.errors.KafkaConfigurationError) as exc:
            raise ConfigurationError(f"invalid consumer_config: {exc}") from exc

        consumer = self

        # kafka-python 3 runs these callbacks on its IO thread: they must not
        # block on the consumer (a synchronous commit there raises), and an
        # exception escaping them would surface from poll().
        class _Listener(kafka.ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: set[Any]) -> None:
                consumer._call_safely(on_revoked, _ours(revoked), False)

            def on_partitions_lost(self, lost: set[Any]) -> None:
                consumer._call_safely(on_revoked, _ours(lost), True)

            def on_partitions_assigned(self, assigned: set[Any]) -> None:
                log.info("assigned partitions: %s", _fmt(assigned))

        self._consumer.subscribe(topics=sorted(topics), listener=_Listener())

    def poll(self, timeout_s: float) -> dict[TopicPartition, list[Message]]:
        """Fetch records as :class:`Message` objects; rebalance callbacks run inside this call."""
        try:
            fetched = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
            return {
                TopicPartition(tp.topic, tp.partition): [to_message(record) for record in records]
                for tp, records in fetched.items()
            }
        except kafka.errors.KafkaError as exc:
            if getattr(exc, "retriable", False) or isinstance(
                exc, kafka.errors.KafkaConnectionError
            ):
                raise TransientError(f"poll failed: {exc}") from exc
            raise

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns now."""
        return _ours(self._consumer.assignment())

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end offset as of the last fetch (no network call), if known."""
        value = self._consumer.highwater(_theirs(partition))
        return int(value) if value is not None else None

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Make the next poll return ``partition`` from ``offset`` again."""
        self._consumer.seek(_theirs(partition), offset)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit ``offsets`` (the next offset to read per partition) synchronously.

        Returns False instead of raising when the group is rebalancing or this
        member was evicted: the records stay uncommitted and whoever owns the
        partition next receives them again, where the dedup store skips them.
        """
        if not offsets:
            return True
        try:
            self._consumer.commit(
                {_theirs(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
            )
        # CommitFailedError (evicted), RebalanceInProgressError, a lost
        # connection: all KafkaErrors, all handled the same way.
        except kafka.errors.KafkaError as exc:
            log.warning("offset commit failed (%s: %s); records will be redelivered "
                        "and skipped as duplicates", type(exc).__name__, exc)
            return False
        return True

    def commit_async(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Send an offset commit without waiting (safe inside rebalance callbacks).

        A failure is only logged: the records are redelivered to the
        partition's next owner and skipped as duplicates.
        """
        if not offsets:
            return

        def done(committed: Any, result: Any) -> None:
            if isinstance(result, BaseException):
                log.warning("offset commit on revocation failed (%s); records will be "
                            "redelivered and skipped as duplicates", result)

        self._consumer.commit_async(
            {_theirs(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}, callback=done
        )

    @staticmethod
    def _call_safely(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("rebalance callback failed")

    def close(self) -> None:
        """Leave the group and close connections (no auto-commit)."""
        self._consumer.close(autocommit=False)


class RecordProducer:
    """kafka-python's producer behind the seam: futures, flushes, and waits for acks."""

    def __init__(self, *, bootstrap_servers: str, config: Mapping[str, Any]) -> None:
        settings = {**PRODUCER_DEFAULTS, **config}
        try:
            self._producer = kafka.KafkaProducer(bootstrap_servers=bootstrap_servers, **settings)
        except kafka.errors.KafkaTimeoutError as exc:
            raise bootstrap_failure(bootstrap_servers, settings, "producer_config", exc) from exc
        except (TypeError, kafka.errors.KafkaConfigurationError) as exc:
            raise ConfigurationError(f"invalid producer_config: {exc}") from exc

    def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None = None,
    ) -> Any:
        """Queue one record; return its future (see :meth:`outcome`)."""
        try:
            return self._producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        except kafka.errors.KafkaError as exc:
            return _FailedSend(exc)

    @staticmethod
    def outcome(future: Any) -> BaseException | None:
        """``None`` if the record behind a completed ``future`` was acknowledged, else the error."""
        if future.succeeded():
            return None
        error: BaseException = (
            future.exception if future.is_done else kafka.errors.KafkaTimeoutError("no acknowledgement yet")
        )
        return error

    def publish(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        timeout_s: float = 10.0,
    ) -> None:
        """Send one record and block until it is acknowledged (acks=all).

        Raises :class:`RecordTooLarge` when the record is too large for the
        topic, :class:`~exactlyonce.ConfigurationError` when no record can
        be published there (not authorized, invalid or internal topic), and
        :class:`~exactlyonce.TransientError` for anything a retry may fix.
        """
        try:
            self.send(topic, key=key, value=value, headers=headers).get(timeout=timeout_s)
        except kafka.errors.KafkaError as exc:
            raise publish_failure(topic, exc) from exc
        except ValueError as exc:
            # kafka-python refuses some topics before sending: "." and "..", internal topics.
            raise ConfigurationError(f"cannot publish to topic {topic!r}: {exc}") from exc

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued record has an outcome (acknowledged or failed)."""
        # On a timeout the futures still pending report it. So they do when
        # kafka-python's flush gives up otherwise (after a fatal error it can
        # raise UnknownError "Future not done").
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka.errors.KafkaError as exc:
            if not isinstance(exc, kafka.errors.KafkaTimeoutError):
                log.debug("producer flush: %s", exc)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to ``timeout_s``, then close; records still in flight then are abandoned."""
        try:
            self._producer.close(timeout=timeout_s)
        except kafka.errors.KafkaTimeoutError:
            # kafka-python's close() gives up at its flush while records are in
            # flight (the broker unreachable), leaving its I/O thread running
            # until they expire: stop that thread without waiting for them.
            sender = getattr(self._producer, "_sender", None)
            if sender is None:
                raise
            sender.force_close()
            sender.join(1.0)
            with contextlib.suppress(kafka.errors.KafkaTimeoutError):
                self._producer.close(timeout=0)


class _FailedSend:
    """The future of a record that kafka-python refused before queueing it."""

    is_done = True

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def succeeded(self) -> bool:
        return False

    def get(self, timeout: float | None = None) -> None:
        raise self.exception


_TLS_PROTOCOLS = ("SSL", "SASL_SSL")
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
#: The mechanisms the diagnosis can replay (user name and password only).
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_PROBE_TIMEOUT_S = 5.0


def bootstrap_failure(servers: str, config: Mapping[str, Any], setting: str, exc: BaseException) -> ExactlyOnceError:
    """The error to raise when a client could not bootstrap: say why, if TLS or SASL is the reason.

    kafka-python only times out; the handshake error it met is in its log (a
    SASL failure not even there: kafka-python 3.0 drops the broker's last
    answer when the broker closes the connection right after it). With TLS
    on, one handshake with the same settings finds a certificate that does not
    verify (or TLS settings that do not load); then one SASL exchange with the
    same settings finds credentials the broker refuses, a mechanism it does
    not enable, or a listener that requires SASL from a client that does not
    speak it. Those are ConfigurationErrors, since retrying cannot fix them;
    anything else stays a TransientError, with a hint about a protocol
    mismatch.
    """
    problem = tls_problem(servers, config)
    if problem is not None:
        return ConfigurationError(
            f"{problem}. Check {setting}: ssl_cafile must name the CA that signed the broker's certificate, "
            "and the certificate must be issued for the address you connect to (ssl_check_hostname)"
        )
    problem = sasl_problem(servers, config)
    if problem is not None:
        return ConfigurationError(f"{problem}. Check {setting}")
    protocol = config.get("security_protocol", "PLAINTEXT")
    return TransientError(
        f"no Kafka broker answers at {servers} with security_protocol={protocol!r} ({exc}); if the broker's "
        "listener uses TLS, set security_protocol='SSL' (or 'SASL_SSL') in consumer_config and producer_config"
    )


def _tls_context(config: Mapping[str, Any]) -> ssl.SSLContext:
    """The client's TLS context, built by kafka-python from the same settings.

    Raises ImportError or AttributeError for another kafka-python layout, and
    OSError or ssl.SSLError for settings that do not load.
    """
    from kafka.net.transport import KafkaSSLTransport

    settings = {**KafkaSSLTransport.DEFAULT_CONFIG,
                **{k: v for k, v in config.items() if k in KafkaSSLTransport.DEFAULT_CONFIG}}
    context: ssl.SSLContext = KafkaSSLTransport._build_ssl_context(settings)
    return context


def _addresses(servers: str) -> Iterable[tuple[str, str, int]]:
    """``(as given, host, port)`` per bootstrap server; malformed ones are left out."""
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        with contextlib.suppress(ValueError):
            yield server.strip(), host.strip("[]"), int(port)


def tls_problem(servers: str, config: Mapping[str, Any]) -> str | None:
    """Handshake with each bootstrap server as the client would; the first TLS failure, or ``None``."""
    if config.get("security_protocol", "PLAINTEXT") not in _TLS_PROTOCOLS:
        return None
    try:
        context = _tls_context(config)
    except (ImportError, AttributeError):
        return None  # another kafka-python layout: no diagnosis
    except (OSError, ssl.SSLError) as exc:
        return f"the TLS settings do not load: {exc}"
    for server, host, port in _addresses(servers):
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return f"TLS certificate verification failed for {server}: {exc.verify_message}"
        except ssl.SSLError as exc:
            return f"TLS handshake with {server} failed: {exc}"
        except OSError:
            continue
    return None


def _exchange(sock: socket.socket, codec: Any, request: Any) -> Any:
    """Send one request over ``sock`` and return the broker's response."""
    codec.send_request(request)
    sock.sendall(codec.send_bytes())
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
        for _, response in codec.receive_bytes(data):
            return response


def sasl_problem(servers: str, config: Mapping[str, Any]) -> str | None:
    """One SASL exchange with each bootstrap server as the client would; the first refusal, or ``None``.

    A SASL client (PLAIN or SCRAM) authenticates with its own credentials:
    the broker's refusal, or a mechanism the broker does not enable, is the
    problem. A client without SASL only asks which mechanisms the listener
    enables: a listener that names some requires SASL. No answer, or an
    answer the diagnosis does not understand, is no diagnosis.
    """
    protocol = config.get("security_protocol", "PLAINTEXT")
    mechanism = config.get("sasl_mechanism") or "PLAIN"
    if protocol in _SASL_PROTOCOLS and mechanism not in _PASSWORD_MECHANISMS:
        return None  # GSSAPI, OAUTHBEARER, ...: not replayed here
    try:
        from kafka.net.sasl import get_sasl_mechanism
        from kafka.protocol.parser import KafkaProtocol
        from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

        context = _tls_context(config) if protocol in _TLS_PROTOCOLS else None
    except (ImportError, AttributeError, OSError, ssl.SSLError):
        return None  # another kafka-python layout, or TLS settings tls_problem reports

    for server, host, port in _addresses(servers):
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S))
                if context is not None:
                    sock = stack.enter_context(context.wrap_socket(sock, server_hostname=host))
                codec = KafkaProtocol(client_id="exactlyonce-diagnosis")
                call = functools.partial(_exchange, sock, codec)
                answer = call(SaslHandshakeRequest(mechanism=mechanism, version=1))
                enabled = ", ".join(answer.mechanisms) or "none"
                if protocol not in _SASL_PROTOCOLS:
                    if answer.mechanisms:
                        wanted = "SASL_SSL" if protocol in _TLS_PROTOCOLS else "SASL_PLAINTEXT"
                        return (f"the listener at {server} requires SASL authentication (mechanisms: {enabled}) "
                                f"but security_protocol={protocol!r}: set security_protocol={wanted!r}, "
                                "sasl_mechanism, sasl_plain_username and sasl_plain_password")
                    continue
                if answer.error_code:
                    return (f"the broker at {server} does not enable SASL mechanism {mechanism!r} "
                            f"(it enables: {enabled}); set sasl_mechanism to one of those")
                user = config.get("sasl_plain_username")
                client = get_sasl_mechanism(mechanism)(
                    host=host, sasl_mechanism=mechanism, sasl_plain_username=user,
                    sasl_plain_password=config.get("sasl_plain_password"))
                while not client.is_done():
                    reply = call(SaslAuthenticateRequest(auth_bytes=client.auth_bytes(), version=1))
                    if reply.error_code:
                        reason = reply.error_message or kafka.errors.for_code(reply.error_code).__name__
                        return (f"SASL authentication failed at {server} (mechanism {mechanism}, user {user!r}): "
                                f"{reason}; sasl_plain_username and sasl_plain_password must be credentials "
                                "the broker knows")
                    client.receive(reply.auth_bytes)
                if not client.is_authenticated():
                    return (f"SASL authentication failed at {server} (mechanism {mechanism}, user {user!r}): "
                            "the broker's final answer did not verify")
        except (OSError, ValueError, kafka.errors.KafkaError):
            continue
    return None


def publish_failure(topic: str, exc: BaseException) -> ExactlyOnceError:
    """The exactlyonce error for a failed publish to ``topic``: too large, refused for good, or transient.

    Only the refusals no retry can fix stop a caller; any other failure
    (retriable or not: a fenced or out-of-sequence producer, say) stays
    transient, as before.
    """
    if isinstance(exc, _TOO_LARGE):
        return RecordTooLarge(f"topic {topic!r} refuses the record as too large ({type(exc).__name__}: {exc})")
    if is_refusal(exc) and not is_retriable(exc):
        return ConfigurationError(
            f"topic {topic!r} refuses the record for good ({type(exc).__name__}: {exc}): check the topic's "
            "name, configuration and ACLs (the producer's principal needs WRITE and DESCRIBE on it)"
        )
    return TransientError(f"publish to {topic!r} failed: {exc}")


def is_retriable(exc: BaseException) -> bool:
    """Whether sending again may succeed (broker down, timeout, leader moved, ...)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, kafka.errors.KafkaTimeoutError | kafka.errors.KafkaConnectionError
    )


#: What the broker (or the client, for ``max_request_size``) says about a
#: record, or its topic, that sending it again cannot change. Anything else
#: that fails a record may be the fault of another record of its batch
#: (kafka-python fails the innocent records of a batch with a plain
#: ``KafkaError``), of the producer (an epoch bump fails the batches in
#: flight) or of the moment.
_TOO_LARGE: tuple[type[BaseException], ...] = (
    kafka.errors.MessageSizeTooLargeError,  # the record alone exceeds max.message.bytes / max_request_size
    kafka.errors.RecordListTooLargeError,
)
_REFUSALS: tuple[type[BaseException], ...] = (
    *_TOO_LARGE,
    kafka.errors.InvalidTopicError,
    kafka.errors.AuthorizationError,  # topic, cluster or transactional-id authorization
    kafka.errors.InvalidRecordError,  # the broker's record validation (e.g. a keyless record on a compacted topic)
    kafka.errors.InvalidTimestampError,
    kafka.errors.PolicyViolationError,
    kafka.errors.InvalidRequiredAcksError,
)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` says this record can never be written as it is (too large, topic invalid or forbidden).

    kafka-python splits a batch the broker finds too large and retries its
    records separately, so a size refusal names a record that is too large
    on its own.
    """
    return isinstance(exc, _REFUSALS)


def is_collateral(exc: BaseException) -> bool:
    """Whether ``exc`` failed a record for another record's fault (a batch-mate the broker found invalid)."""
    # kafka-python gives the innocent records of such a batch a bare KafkaError.
    return type(exc) is kafka.errors.KafkaError


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"
