"""The runtime's consumer on confluent-kafka (librdkafka), for ``App(kafka_client="confluent")``.

The same interface as :class:`exactlyonce._kafka.clients.Consumer`, so the
runtime cannot tell them apart; only the consumer changes: dead letters and
the outbox relay are still published with kafka-python's producer. Its
``config`` takes librdkafka's property names (``session.timeout.ms``,
``security.protocol``), not kafka-python's.

This module imports ``confluent_kafka`` (the ``exactlyonce[confluent]``
extra): it is imported only when that client is selected.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from exactlyonce._kafka.clients import TopicPartition, partitions_of
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.message import Message

log = logging.getLogger("exactlyonce")

__all__ = ["CONFLUENT_CONSUMER_DEFAULTS", "RECORDS_PER_POLL", "ConfluentConsumer", "from_confluent"]

#: exactlyonce's librdkafka consumer defaults (those of kafka-python's consumer,
#: spelled for librdkafka); ``App(consumer_config=...)`` overrides them.
CONFLUENT_CONSUMER_DEFAULTS: dict[str, Any] = {
    # Offsets are committed by the runner, and only after the database commit.
    "enable.auto.commit": False,
    # Nor does librdkafka store an offset of its own accord (what auto-commit would send).
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 3_000,
}

#: The most records one poll returns (kafka-python's ``max_poll_records`` default; not configurable here).
RECORDS_PER_POLL = 500

#: How long the constructor waits for a broker to answer a metadata request.
METADATA_TIMEOUT_S = 10.0

# Set by exactlyonce: refused in consumer_config, with where to set them instead.
_OWNED = {
    "group.id": "set group_id on App",
    "bootstrap.servers": "set bootstrap_servers on App",
    "metadata.broker.list": "set bootstrap_servers on App",
    "error_cb": "exactlyonce reports the client's errors itself",
    "on_commit": "exactlyonce reports failed commits itself",
}

# The python binding's own settings (callables), not librdkafka properties: their names have underscores.
_BINDING_SETTINGS = frozenset({"stats_cb", "throttle_cb", "oauth_cb", "logger"})

# kafka-python settings whose librdkafka name is not just the dotted spelling.
_RENAMED = {
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm ('https' or 'none')",
    "sasl_mechanism": "sasl.mechanisms",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "max_poll_records": None,
    "api_version": None,
}

# Codes of errors a retry may fix besides those librdkafka marks retriable.
_TRANSIENT_CODES = frozenset({
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._RESOLVE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
})

# Codes that no retry fixes: the settings or the broker's ACLs must change.
_REFUSED_CODES = frozenset({
    KafkaError._INVALID_ARG,
    KafkaError._SSL,
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.INVALID_CONFIG,
})


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse what the confluent consumer would not honour: kafka-python's names, settings exactlyonce owns."""
    for key, value in config.items():
        if key in _OWNED:
            raise ConfigurationError(f"consumer_config {key!r}: {_OWNED[key]}, not in consumer_config")
        if key == "enable.auto.commit" and _is_true(value):
            # Auto-commit would commit offsets before the database commit: a
            # crash in between would lose the record.
            raise ConfigurationError("consumer_config enable.auto.commit=true breaks the guarantee; leave it off")
        if "_" in key and key not in _BINDING_SETTINGS:
            raise ConfigurationError(_kafka_python_key(key))


def _kafka_python_key(key: str) -> str:
    intro = (f"consumer_config {key!r} looks like a kafka-python setting; the confluent client "
             "(kafka_client='confluent') takes librdkafka property names")
    if key in _RENAMED:
        equivalent = _RENAMED[key]
        if equivalent is None:
            return f"{intro}, and librdkafka has no equivalent of this one"
        return f"{intro}: use {equivalent!r}"
    return f"{intro}: probably {key.replace('_', '.')!r} (see librdkafka's CONFIGURATION.md)"


def _is_true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def from_confluent(record: Any) -> Message:
    """Turn a confluent-kafka ``Message`` (without error) into a :class:`Message`."""
    kind, stamp = record.timestamp()
    return Message(
        topic=record.topic(),
        partition=record.partition(),
        offset=record.offset(),
        key=record.key(),
        value=record.value(),
        headers=tuple((name, value or b"") for name, value in (record.headers() or ())),
        timestamp_ms=None if kind == confluent_kafka.TIMESTAMP_NOT_AVAILABLE else stamp,
    )


def _theirs(offsets: Mapping[TopicPartition, int]) -> list[Any]:
    return [confluent_kafka.TopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]


def _failure(error: Any, doing: str) -> Exception:
    """The exactlyonce exception for a librdkafka error met while ``doing`` something."""
    text = f"{doing}: {error.str()} ({error.name()})"
    if error.fatal() or error.code() in _REFUSED_CODES:
        return ConfigurationError(text)
    return TransientError(text)


class ConfluentConsumer:
    """A group consumer on librdkafka that commits only the offsets it is told to."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str,
        topics: Iterable[str],
        config: Mapping[str, Any],
        on_revoked: Callable[[set[TopicPartition], bool], None],
    ) -> None:
        check_config(config)
        self._on_revoked = on_revoked
        #: The client's last error report (a broker down, a TLS failure), for the bootstrap error's message.
        self._last_error: Any = None
        #: The last report of a refusal (a TLS handshake, a login), and how many of its kind came in a row.
        self._refusal: Any = None
        self._refusals = 0
        #: An error met with records in the same poll: raised by the next poll, after those records.
        self._deferred: Exception | None = None
        #: Asynchronous commits sent and not answered: what each committed, and whom to tell.
        self._unanswered: list[tuple[frozenset[tuple[str, int, int]], Callable[[bool], None] | None]] = []
        settings = {
            **CONFLUENT_CONSUMER_DEFAULTS,
            **config,
            # librdkafka's own log lines go to Python logging, not straight to stderr.
            "logger": config.get("logger", logging.getLogger("librdkafka")),
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
        }
        try:
            self._consumer = confluent_kafka.Consumer(settings)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid consumer_config for the confluent client: {_text(exc)}") from exc
        self._topics = sorted(topics)
        try:
            self._read_metadata(bootstrap_servers)
            self._consumer.subscribe(self._topics, on_assign=self._assigned, on_revoke=self._revoked,
                                     on_lost=self._lost)
        except BaseException:
            self._consumer.close()
            raise

    def _read_metadata(self, bootstrap_servers: str) -> None:
        """Wait (boundedly) for a broker, and have the subscribed topics' partitions known before the first poll.

        librdkafka never fails at construction: without this a worker whose
        broker does not answer would poll forever instead of raising
        TransientError (the runtime's startup retry). The topics' metadata is
        read for the reason :class:`~exactlyonce._kafka.clients.Consumer`
        reads it: an assignment computed without it can give this member nothing.
        """
        wanted: list[str | None] = [*self._topics] or [None]
        for topic in wanted:
            try:
                self._consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
            except KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is not None and (error.fatal() or error.code() in _REFUSED_CODES):
                    raise _failure(error, "could not read topic metadata") from exc
                with contextlib.suppress(KafkaException, RuntimeError):
                    # Serve the client's queued error reports (error_cb runs inside poll()): the
                    # reason no broker answered, such as a TLS handshake failure.
                    self._consumer.poll(0)
                refusal = self._refusal
                if refusal is not None and self._refusals >= 2:
                    # The broker refused the TLS handshake or the login again and again:
                    # retrying cannot fix the settings. (Once only may be a broker still starting.)
                    raise ConfigurationError(
                        f"no broker of {bootstrap_servers} could be reached: {refusal.str()} ({refusal.name()}); "
                        "check the TLS/SASL settings in consumer_config (librdkafka's names: "
                        "security.protocol, ssl.ca.location, sasl.mechanisms, ...)") from exc
                last = refusal if refusal is not None else self._last_error
                seen = f"; the client reported: {last.str()}" if last is not None else ""
                raise TransientError(f"no broker of {bootstrap_servers} answered within "
                                     f"{METADATA_TIMEOUT_S:.0f} s ({_text(exc)}){seen}") from exc

    # -- the client's callbacks (run inside consume(), as kafka-python's listener runs inside poll()) --

    def _on_error(self, error: Any) -> None:
        # librdkafka reports each failed reconnection: warn once per distinct error in a row.
        repeated = self._last_error is not None and self._last_error.str() == error.str()
        self._last_error = error
        if error.code() in _REFUSED_CODES:
            # (By code: the text varies, "after 1ms in state SSL_HANDSHAKE" and the like.)
            same = self._refusal is not None and self._refusal.code() == error.code()
            self._refusals = self._refusals + 1 if same else 1
            self._refusal = error
        log.log(logging.DEBUG if repeated else logging.WARNING, "kafka client: %s (%s)", error.str(), error.name())

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("assigned partitions: %s", _fmt(partitions_of(partitions)))

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        self._call_safely(partitions_of(partitions), False)

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        self._call_safely(partitions_of(partitions), True)

    def _call_safely(self, partitions: set[TopicPartition], lost: bool) -> None:
        try:
            self._on_revoked(partitions, lost)
        except Exception:
            log.exception("rebalance callback failed")

    # -- the Consumer interface ----------------------------------------------------------------------

    def poll(self, timeout_s: float) -> dict[TopicPartition, list[Message]]:
        """Fetch up to :data:`RECORDS_PER_POLL` records as :class:`Message` objects, each partition's in order.

        Rebalance callbacks run inside this call. An error reported with
        records is raised by the next call, so that no fetched record is
        dropped (the consumer's position is already past them).
        """
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            raise deferred
        try:
            fetched = self._consumer.consume(num_messages=RECORDS_PER_POLL, timeout=max(timeout_s, 0.0))
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is None:
                raise TransientError(f"poll failed: {_text(exc)}") from exc
            raise _failure(error, "poll failed") from exc
        batch: dict[TopicPartition, list[Message]] = {}
        problem: Exception | None = None
        for record in fetched:
            error = record.error()
            if error is None:
                message = from_confluent(record)
                batch.setdefault(TopicPartition(message.topic, message.partition), []).append(message)
            elif error.code() != KafkaError._PARTITION_EOF and problem is None:
                problem = _failure(error, f"poll failed on {record.topic()}[{record.partition()}]")
        if problem is not None:
            if not batch:
                raise problem
            self._deferred = problem
        return batch

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns now."""
        return partitions_of(self._consumer.assignment())

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end offset as of the last fetch (no network call), if known."""
        try:
            _, high = self._consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(partition.topic, partition.partition), cached=True)
        except KafkaException:
            return None
        return int(high) if high is not None and high >= 0 else None

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Make the next poll return ``partition`` from ``offset`` again (records fetched past it are dropped)."""
        try:
            self._consumer.seek(confluent_kafka.TopicPartition(partition.topic, partition.partition, offset))
        except KafkaException as exc:
            if partition not in self.assignment():
                # Not assigned any more (a rebalance in between): its next
                # owner starts from the committed offset, at or below ``offset``.
                log.warning("seek %s[%d] to %d failed (%s); its next owner reads it from the committed offset",
                            partition.topic, partition.partition, offset, _text(exc))
                return
            # Still ours: polling on would skip the records from ``offset``.
            raise TransientError(f"seek {partition.topic}[{partition.partition}] to {offset} failed: "
                                 f"{_text(exc)}") from exc

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit ``offsets`` (the next offset to read per partition) synchronously.

        Returns False instead of raising when the group is rebalancing, this
        member was evicted, or the coordinator cannot be reached: the records
        stay uncommitted and whoever owns the partition next receives them
        again, where the dedup store skips them.
        """
        if not offsets:
            return True
        try:
            results = self._consumer.commit(offsets=_theirs(offsets), asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed (%s); records will be redelivered and skipped as duplicates",
                        _text(exc))
            return False
        failed = [tp for tp in results or () if tp.error is not None]
        if failed:
            log.warning("offset commit failed for %s (%s); records will be redelivered and skipped as duplicates",
                        _fmt(partitions_of(failed)), _text(failed[0].error))
            return False
        return True

    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     on_done: Callable[[bool], None] | None = None) -> None:
        """Send an offset commit without waiting; ``on_done(ok)`` is told the answer.

        librdkafka answers through ``on_commit``, served inside a later poll.
        A failure is only logged: the records are redelivered and skipped as
        duplicates.
        """
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=_theirs(offsets), asynchronous=True)
        except KafkaException as exc:
            log.warning("offset commit failed (%s); records will be redelivered "
                        "and skipped as duplicates", _text(exc))
            if on_done is not None:
                on_done(False)
            return
        self._unanswered.append((frozenset((tp.topic, tp.partition, o) for tp, o in offsets.items()), on_done))

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        failed = error is not None or any(tp.error is not None for tp in partitions or ())
        if failed:
            log.warning("offset commit failed (%s); records will be redelivered and skipped as duplicates",
                        _text(error if error is not None else next(tp.error for tp in partitions if tp.error)))
        # The answer of which commit: the one that sent these offsets (a
        # synchronous commit's answer matches none and is ignored here).
        answered = frozenset((tp.topic, tp.partition, tp.offset) for tp in partitions or ())
        for index, (sent, on_done) in enumerate(self._unanswered):
            if sent == answered or (error is not None and not answered):
                del self._unanswered[index]
                if on_done is not None:
                    on_done(not failed)
                return

    def close(self) -> None:
        """Leave the group and close connections (no auto-commit)."""
        self._consumer.close()


def _text(exc: Any) -> str:
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    if isinstance(error, KafkaError):
        return f"{error.str()} ({error.name()})"
    return str(error)


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"
