"""Group-less reads for the operator commands: partitions, offsets, a group's committed offsets, whole topics.

Nothing here joins a consumer group: offsets are read with a group-less
consumer (``committed()`` and ``end_offsets()`` are plain requests), so
running ``exactlyonce status`` never triggers a rebalance of the workers it
observes. Records come back as :class:`~exactlyonce.Message` objects,
partitions as their numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import kafka
import kafka.errors
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.structs import TopicPartition as _KafkaTopicPartition

from exactlyonce._kafka.clients import to_message
from exactlyonce._kafka.diagnosis import bootstrap_failure
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.message import Message

log = logging.getLogger("exactlyonce.admin")

__all__ = ["KafkaReader", "client_config", "consumer_settings", "producer_settings", "unknown_kafka_settings"]

# The admin clients give up quickly: an operator waiting at a prompt wants
# "lag unknown" in seconds, not kafka-python's minute-long defaults.
_CLIENT_DEFAULTS: dict[str, Any] = {"request_timeout_ms": 10_000, "bootstrap_timeout_ms": 5_000}


def client_config(client: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``config`` that kafka-python's ``client`` class accepts.

    One ``--kafka-config`` (TLS, SASL, timeouts) serves the consumer and the
    producer alike, but kafka-python refuses keys a client does not know.
    """
    known = getattr(client, "DEFAULT_CONFIG", {})
    return {key: value for key, value in config.items() if key in known}


def producer_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``config`` a ``KafkaProducer`` takes (the replay's security settings)."""
    return client_config(kafka.KafkaProducer, config)


def consumer_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``config`` a ``KafkaConsumer`` takes."""
    return client_config(kafka.KafkaConsumer, config)


def unknown_kafka_settings(config: Iterable[str]) -> list[str]:
    """The names in ``config`` that none of kafka-python's clients (consumer, producer, admin) knows."""
    known = {*kafka.KafkaConsumer.DEFAULT_CONFIG, *kafka.KafkaProducer.DEFAULT_CONFIG,
             *kafka.KafkaAdminClient.DEFAULT_CONFIG}
    return [name for name in config if name not in known]


class KafkaReader:
    """Group-less reads: partitions, offsets, a group's committed offsets, whole topics, topic settings.

    ``config`` is extra kafka-python settings (security, timeouts), filtered
    per client. The connection is opened lazily; an unreachable broker raises
    :class:`~exactlyonce.TransientError`.
    """

    def __init__(self, bootstrap_servers: str, config: Mapping[str, Any] | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.config = {**_CLIENT_DEFAULTS, **dict(config or {})}
        self._consumer: Any = None
        self._group_consumers: dict[str, Any] = {}
        self._admin: Any = None

    def _new_consumer(self, **settings: Any) -> Any:
        options = {**client_config(kafka.KafkaConsumer, self.config), "enable_auto_commit": False, **settings}
        log.debug("connecting to %s with %s", self.bootstrap_servers, options)
        try:
            return kafka.KafkaConsumer(bootstrap_servers=self.bootstrap_servers, **options)
        except (TypeError, ValueError, kafka.errors.KafkaConfigurationError) as exc:
            raise ConfigurationError(f"invalid Kafka client settings: {exc}") from exc
        except kafka.errors.KafkaError as exc:
            # kafka-python 3 raises KafkaTimeoutError("Unable to bootstrap ...") for an unreachable broker,
            # and for one that refuses the client's certificate check or SASL credentials: say which.
            failure = bootstrap_failure(self.bootstrap_servers, options, "--kafka-config", exc)
            if isinstance(failure, ConfigurationError):
                raise failure from exc
            raise TransientError(f"no Kafka broker answers at {self.bootstrap_servers}: {exc}") from exc

    def _group_less(self) -> Any:
        """A consumer without a group (created on first use)."""
        if self._consumer is None:
            self._consumer = self._new_consumer()
        return self._consumer

    def _admin_client(self) -> Any:
        """An admin client (created on first use)."""
        if self._admin is None:
            options = client_config(kafka.KafkaAdminClient, self.config)
            log.debug("connecting an admin client to %s with %s", self.bootstrap_servers, options)
            try:
                self._admin = kafka.KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **options)
            except (TypeError, ValueError, kafka.errors.KafkaConfigurationError) as exc:
                raise ConfigurationError(f"invalid Kafka client settings: {exc}") from exc
            except kafka.errors.KafkaError as exc:
                raise TransientError(f"no Kafka broker answers at {self.bootstrap_servers}: {exc}") from exc
        return self._admin

    def topic_configs(self, topics: Iterable[str], names: Iterable[str]) -> dict[str, dict[str, str | None]]:
        """The values of the settings ``names`` of each of ``topics``, defaults included.

        A topic the broker does not know gets an empty dict (kafka-python
        drops the per-topic error code, and the broker sends no settings).
        """
        wanted = list(topics)
        keys = list(names)
        if not wanted:
            return {}
        resources = [ConfigResource(ConfigResourceType.TOPIC, topic, keys) for topic in wanted]
        found = self._call(
            lambda: self._admin_client().describe_configs(resources, config_filter="all")).get("topic", {})
        return {topic: {name: entry.get("value") for name, entry in (found.get(topic) or {}).items()}
                for topic in wanted}

    def oldest_timestamps(self, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """The timestamp (ms) of the first record still in each partition; ``None`` for an empty one.

        A ListOffsets by timestamp 0 answers with the earliest offset whose
        timestamp is at least 0: the record at the log-start offset, and its
        timestamp, without fetching it.
        """
        tps = [_KafkaTopicPartition(topic, p) for p in partitions]
        if not tps:
            return {}
        found = self._call(lambda: self._group_less().offsets_for_times({tp: 0 for tp in tps}))
        return {tp.partition: None if found.get(tp) is None else int(found[tp].timestamp) for tp in tps}

    def partitions(self, topic: str) -> list[int]:
        """The topic's partition numbers (empty if the topic does not exist)."""
        return sorted(self._call(lambda: self._group_less().partitions_for_topic(topic)) or ())

    def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The next offset to be written, per partition."""
        tps = [_KafkaTopicPartition(topic, p) for p in partitions]
        return {tp.partition: int(o) for tp, o in self._call(lambda: self._group_less().end_offsets(tps)).items()}

    def beginning_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The oldest offset still in the log, per partition."""
        tps = [_KafkaTopicPartition(topic, p) for p in partitions]
        return {tp.partition: int(o)
                for tp, o in self._call(lambda: self._group_less().beginning_offsets(tps)).items()}

    def committed(self, group_id: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """``group_id``'s committed offsets (``None``: never committed), read without joining the group.

        A consumer created with ``group_id`` joins only when it subscribes and
        polls; ``committed()`` is a bare OffsetFetch to the coordinator.
        """
        consumer = self._group_consumers.get(group_id)
        if consumer is None:
            consumer = self._group_consumers[group_id] = self._new_consumer(group_id=group_id)
        result: dict[int, int | None] = {}
        for p in partitions:
            offset = self._call(partial(consumer.committed, _KafkaTopicPartition(topic, p)))
            result[p] = None if offset is None else int(offset)
        return result

    def read_all(
        self, topic: str, *, limit: int | None = None, idle_timeout_s: float = 10.0, newest: int | None = None
    ) -> list[Message]:
        """Every record of ``topic`` from its beginning to the end offsets seen at the start, oldest first.

        Partitions are assigned, not subscribed: no group, no committed
        offsets, nothing for a worker to notice. Stops early after ``limit``
        records, or when no record arrives for ``idle_timeout_s`` seconds
        while some partition is still short of its end offset (a compacted or
        transactional log can have offsets that hold no record).

        ``newest``: only the newest ``newest`` records (by timestamp) of the
        whole topic; each partition is read from at most that many offsets
        before its end instead of from its beginning.
        """
        if newest is not None and newest < 1:
            raise ConfigurationError("newest must be at least 1")
        numbers = self.partitions(topic)
        if not numbers:
            raise ConfigurationError(f"topic {topic!r} does not exist")
        end = self.end_offsets(topic, numbers)
        starts = self.beginning_offsets(topic, numbers)
        if newest is not None:
            starts = {p: max(start, end[p] - newest) for p, start in starts.items()}
        records = self._read(topic, starts, end, limit=None if newest is not None else limit,
                             idle_timeout_s=idle_timeout_s)
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        if newest is not None:
            records = records[-newest:]
        return [to_message(record) for record in (records[:limit] if limit is not None else records)]

    def read_at(
        self, topic: str, positions: Iterable[tuple[int, int]], *, idle_timeout_s: float = 10.0
    ) -> list[Message]:
        """The records of ``topic`` at the given ``(partition, offset)`` positions, in that order.

        A position that holds no record (deleted by retention, past the end,
        a partition the topic does not have) is left out.
        """
        wanted = sorted(set(positions))
        numbers = set(self.partitions(topic))
        if not numbers:
            raise ConfigurationError(f"topic {topic!r} does not exist")
        by_partition: dict[int, list[int]] = {}
        for partition, offset in wanted:
            if partition in numbers and offset >= 0:
                by_partition.setdefault(partition, []).append(offset)
        if not by_partition:
            return []
        end = self.end_offsets(topic, by_partition)
        beginning = self.beginning_offsets(topic, by_partition)
        starts = {p: max(beginning[p], min(offsets)) for p, offsets in by_partition.items()}
        ends = {p: min(end[p], max(offsets) + 1) for p, offsets in by_partition.items()}
        found = {(r.partition, r.offset): r for r in self._read(topic, starts, ends, idle_timeout_s=idle_timeout_s)}
        return [to_message(found[position]) for position in wanted if position in found]

    def _read(
        self, topic: str, starts: Mapping[int, int], ends: Mapping[int, int], *, limit: int | None = None,
        idle_timeout_s: float = 10.0,
    ) -> list[Any]:
        """kafka-python's records of each partition from ``starts[p]`` up to (not including) ``ends[p]``, unsorted."""
        tps = [_KafkaTopicPartition(topic, p) for p in sorted(starts) if starts[p] < ends.get(p, 0)]
        if not tps:
            return []
        end = {tp: ends[tp.partition] for tp in tps}
        consumer = self._new_consumer(auto_offset_reset="earliest")
        try:
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, starts[tp.partition])
            records: list[Any] = []
            idle_rounds = 0
            while any(consumer.position(tp) < end[tp] for tp in tps):
                batch = self._call(lambda: consumer.poll(timeout_ms=500))
                fetched = [record for part in batch.values() for record in part if record.offset < end[
                    _KafkaTopicPartition(record.topic, record.partition)]]
                if not fetched:
                    idle_rounds += 1
                    if idle_rounds * 0.5 >= idle_timeout_s:
                        log.warning("%s: no record for %.0fs before the end offsets %s; showing what was read",
                                    topic, idle_timeout_s, {tp.partition: o for tp, o in end.items()})
                        break
                    continue
                idle_rounds = 0
                records.extend(fetched)
                if limit is not None and len(records) >= limit:
                    break
            return records
        finally:
            consumer.close(autocommit=False)

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except kafka.errors.KafkaError as exc:
            raise TransientError(f"Kafka request failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Close every connection opened."""
        for consumer in [self._consumer, *self._group_consumers.values()]:
            if consumer is not None:
                consumer.close(autocommit=False)
        self._consumer = None
        self._group_consumers.clear()
        if self._admin is not None:
            self._admin.close()
            self._admin = None
