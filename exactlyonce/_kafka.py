"""The seam between the runtime and kafka-python (the consumer and producers).

Only this module and :mod:`exactlyonce.admin` (the operator commands'
group-less reads) import kafka-python.

Durations are ``timedelta`` everywhere else and become kafka-python's ``*_ms``
settings here; kafka-python's exceptions become exactlyonce's here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kafka
import kafka.errors
from kafka.structs import OffsetAndMetadata, TopicPartition

from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError
from exactlyonce.message import Message

log = logging.getLogger("exactlyonce")

__all__ = ["Consumer", "RecordProducer", "RecordTooLarge", "TopicPartition", "is_retriable", "to_message"]

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


#: Broker errors that no retry can fix: the topic, its ACLs or its configuration must change.
_REFUSALS: tuple[type[kafka.errors.KafkaError], ...] = (
    kafka.errors.AuthorizationError,
    kafka.errors.InvalidTopicError,
    kafka.errors.InvalidRecordError,
    kafka.errors.InvalidRequiredAcksError,
)
_TOO_LARGE: tuple[type[kafka.errors.KafkaError], ...] = (
    kafka.errors.MessageSizeTooLargeError,
    kafka.errors.RecordListTooLargeError,
)


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
            def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                consumer._call_safely(on_revoked, set(revoked), False)

            def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
                consumer._call_safely(on_revoked, set(lost), True)

            def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                log.info("assigned partitions: %s", _fmt(assigned))

        self._consumer.subscribe(topics=sorted(topics), listener=_Listener())

    def poll(self, timeout_s: float) -> dict[TopicPartition, list[Any]]:
        """Fetch records; rebalance callbacks run inside this call."""
        try:
            return dict(self._consumer.poll(timeout_ms=int(timeout_s * 1000)))
        except kafka.errors.KafkaError as exc:
            if getattr(exc, "retriable", False) or isinstance(
                exc, kafka.errors.KafkaConnectionError
            ):
                raise TransientError(f"poll failed: {exc}") from exc
            raise

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns now."""
        return set(self._consumer.assignment())

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end offset as of the last fetch (no network call), if known."""
        value = self._consumer.highwater(partition)
        return int(value) if value is not None else None

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Make the next poll return ``partition`` from ``offset`` again."""
        self._consumer.seek(partition, offset)

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
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
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
            {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}, callback=done
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
        # On a timeout the futures still pending report it.
        with contextlib.suppress(kafka.errors.KafkaTimeoutError):
            self._producer.flush(timeout=timeout_s)

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


def bootstrap_failure(servers: str, config: Mapping[str, Any], setting: str, exc: BaseException) -> ExactlyOnceError:
    """The error to raise when a client could not bootstrap: say why, if TLS is the reason.

    kafka-python only times out; the handshake error it met is in its log.
    With TLS on, one handshake with the same settings finds it again: a
    certificate that does not verify (or TLS settings that do not load) is a
    ConfigurationError, since retrying cannot fix it; anything else stays a
    TransientError, with a hint about a protocol mismatch.
    """
    problem = tls_problem(servers, config)
    if problem is not None:
        return ConfigurationError(
            f"{problem}. Check {setting}: ssl_cafile must name the CA that signed the broker's certificate, "
            "and the certificate must be issued for the address you connect to (ssl_check_hostname)"
        )
    protocol = config.get("security_protocol", "PLAINTEXT")
    return TransientError(
        f"no Kafka broker answers at {servers} with security_protocol={protocol!r} ({exc}); if the broker's "
        "listener uses TLS, set security_protocol='SSL' (or 'SASL_SSL') in consumer_config and producer_config"
    )


def tls_problem(servers: str, config: Mapping[str, Any]) -> str | None:
    """Handshake with each bootstrap server as the client would; the first TLS failure, or ``None``."""
    if config.get("security_protocol", "PLAINTEXT") not in _TLS_PROTOCOLS:
        return None
    try:
        from kafka.net.transport import KafkaSSLTransport

        settings = {**KafkaSSLTransport.DEFAULT_CONFIG,
                    **{k: v for k, v in config.items() if k in KafkaSSLTransport.DEFAULT_CONFIG}}
        context: ssl.SSLContext = KafkaSSLTransport._build_ssl_context(settings)
    except (ImportError, AttributeError):
        return None  # another kafka-python layout: no diagnosis
    except (OSError, ssl.SSLError) as exc:
        return f"the TLS settings do not load: {exc}"
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return f"TLS certificate verification failed for {server.strip()}: {exc.verify_message}"
        except ssl.SSLError as exc:
            return f"TLS handshake with {server.strip()} failed: {exc}"
        except (OSError, ValueError):
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
    if isinstance(exc, _REFUSALS) and not is_retriable(exc):
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


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"
