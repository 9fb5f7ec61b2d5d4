"""The runtime's consumer and producer: kafka-python's clients wrapped to speak exactlyonce's types."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import kafka
import kafka.errors
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as _KafkaTopicPartition

from exactlyonce._kafka.diagnosis import bootstrap_failure
from exactlyonce._kafka.failures import publish_failure
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.message import Message

log = logging.getLogger("exactlyonce")

__all__ = ["CONSUMER_DEFAULTS", "PRODUCER_DEFAULTS", "Consumer", "RecordProducer", "TopicPartition", "to_message"]

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


def partitions_of(partitions: Iterable[Any]) -> set[TopicPartition]:
    """Any client's topic-partitions (``.topic``, ``.partition``) as this seam's."""
    return {TopicPartition(tp.topic, tp.partition) for tp in partitions}


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
                consumer._call_safely(on_revoked, partitions_of(revoked), False)

            def on_partitions_lost(self, lost: set[Any]) -> None:
                consumer._call_safely(on_revoked, partitions_of(lost), True)

            def on_partitions_assigned(self, assigned: set[Any]) -> None:
                log.info("assigned partitions: %s", _fmt(assigned))

        self._consumer.subscribe(topics=sorted(topics), listener=_Listener())
        # Have the subscribed topics' partitions in the metadata cache before
        # the first poll joins the group: an assignment computed from a cache
        # that lacks them gives this member nothing, and kafka-python may not
        # notice for minutes (seen once in CI under load; dpkp/kafka-python#2377).
        try:
            self._consumer.topics()
        except kafka.errors.KafkaError as exc:
            self._consumer.close()
            raise TransientError(f"could not read topic metadata: {exc}") from exc

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
        return partitions_of(self._consumer.assignment())

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

    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     on_done: Callable[[bool], None] | None = None) -> None:
        """Send an offset commit without waiting (safe inside rebalance callbacks).

        ``on_done(ok)`` is called with the broker's answer, on the client's
        I/O thread. A failure is only logged: uncommitted records are
        redelivered (to this member, or the partition's next owner) and
        skipped as duplicates.
        """
        if not offsets:
            return

        def done(committed: Any, result: Any) -> None:
            failed = isinstance(result, BaseException)
            if failed:
                log.warning("offset commit failed (%s: %s); records will be redelivered "
                            "and skipped as duplicates", type(result).__name__, result)
            if on_done is not None:
                on_done(not failed)

        try:
            self._consumer.commit_async(
                {_theirs(tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}, callback=done
            )
        except kafka.errors.KafkaError as exc:
            done(offsets, exc)

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
        #: How long every queued record can take to get an outcome: kafka-python fails a record
        #: ``delivery_timeout_ms`` after its send, plus a margin. Past it a record with none is stuck.
        self.stall_s = self._producer.config["delivery_timeout_ms"] / 1000 + _STALL_MARGIN_S

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
        started_ms = time.monotonic() * 1000
        try:
            self.send(topic, key=key, value=value, headers=headers).get(timeout=timeout_s)
        except kafka.errors.KafkaError as exc:
            raise publish_failure(topic, exc, missing=self._missing(topic, exc, started_ms)) from exc
        except ValueError as exc:
            # kafka-python refuses some topics before sending: "." and "..", internal topics.
            raise ConfigurationError(f"cannot publish to topic {topic!r}: {exc}") from exc

    def _missing(self, topic: str, exc: BaseException, since_ms: float) -> bool:
        """Whether a metadata timeout for ``topic`` came from a cluster that answers, without the topic.

        kafka-python's ClusterMetadata (no public accessor): a metadata
        response received since ``since_ms`` that did not list the topic.
        A broker that does not answer leaves no such response.
        """
        if not isinstance(exc, kafka.errors.KafkaTimeoutError):
            return False
        cluster = getattr(self._producer, "_metadata", None)
        refreshed = getattr(cluster, "_last_successful_refresh_ms", None)
        if cluster is None or refreshed is None or refreshed < since_ms:
            return False
        return topic not in cluster.topics(exclude_internal_topics=False)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued record has an outcome (acknowledged or failed); return whether all have.

        ``timeout_s`` bounds the whole wait (about: a step may overrun it by
        a tenth of a second per partition in flight). kafka-python's own
        ``flush(timeout)`` waits ``timeout`` for *each* batch in flight, so
        after a whole-cluster restart a 10 s flush could last minutes; it is
        called here in short steps against one deadline instead.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            step = _FLUSH_STEP_S if deadline is None else max(0.0, min(_FLUSH_STEP_S, deadline - time.monotonic()))
            try:
                self._producer.flush(timeout=step)
                return True
            except kafka.errors.KafkaTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
            except kafka.errors.KafkaError as exc:
                # After a fatal error kafka-python can raise UnknownError "Future
                # not done": the futures report their own outcome.
                log.debug("producer flush: %s", exc)
                return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to about ``timeout_s``, then close; records still in flight then are abandoned."""
        if self.flush(timeout_s):
            # Nothing in flight: closing only joins the I/O thread (bounded too).
            with contextlib.suppress(kafka.errors.KafkaError):
                self._producer.close(timeout=1.0)
            return
        # Records in flight (the broker unreachable): kafka-python's close()
        # would wait at its flush, then leave its I/O thread running until they
        # expire: stop that thread without waiting for them.
        sender = getattr(self._producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(1.0)
        with contextlib.suppress(kafka.errors.KafkaError):
            self._producer.close(timeout=0)


#: One step of :meth:`RecordProducer.flush`'s wait.
_FLUSH_STEP_S = 0.1
#: Added to ``delivery_timeout_ms`` in :attr:`RecordProducer.stall_s`.
_STALL_MARGIN_S = 10.0


class _FailedSend:
    """The future of a record that kafka-python refused before queueing it."""

    is_done = True

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def succeeded(self) -> bool:
        return False

    def get(self, timeout: float | None = None) -> None:
        raise self.exception


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"
