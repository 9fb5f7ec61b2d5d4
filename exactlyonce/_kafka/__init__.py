"""The seam between exactlyonce and kafka-python: the only part of the package that imports it.

- :mod:`~exactlyonce._kafka.clients`: the runtime's consumer (``poll`` returns
  :class:`~exactlyonce.Message` objects) and producer, and this seam's own
  :class:`TopicPartition`.
- :mod:`~exactlyonce._kafka.selection`: which client the worker's consumer runs
  on (``App(kafka_client=...)``); :mod:`~exactlyonce._kafka.confluent`, the
  consumer on confluent-kafka (librdkafka, an optional extra), is imported
  only when selected.
- :mod:`~exactlyonce._kafka.failures`: kafka-python's send errors sorted by
  how a caller reacts (too large, refused for good, transient).
- :mod:`~exactlyonce._kafka.diagnosis`: why a client could not bootstrap
  (TLS, SASL), replayed with the client's settings.
- :mod:`~exactlyonce._kafka.reader`: the operator commands' group-less reads
  (partitions, offsets, another group's committed offsets, whole topics,
  topic settings) and the filtering of ``--kafka-config`` per client.

Durations are ``timedelta`` everywhere else and become kafka-python's ``*_ms``
settings here; kafka-python's exceptions become exactlyonce's here. Import the
names from this package, not from its modules.
"""

from __future__ import annotations

from exactlyonce._kafka.clients import (
    CONSUMER_DEFAULTS,
    PRODUCER_DEFAULTS,
    Consumer,
    RecordProducer,
    TopicPartition,
    to_message,
)
from exactlyonce._kafka.diagnosis import bootstrap_failure, sasl_problem, tls_problem
from exactlyonce._kafka.failures import (
    RecordTooLarge,
    is_collateral,
    is_refusal,
    is_retriable,
    publish_failure,
)
from exactlyonce._kafka.reader import (
    KafkaReader,
    client_config,
    consumer_settings,
    producer_settings,
    unknown_kafka_settings,
)
from exactlyonce._kafka.selection import DEFAULT_KAFKA_CLIENT, KAFKA_CLIENTS, check_kafka_client, consumer_factory

__all__ = [
    "CONSUMER_DEFAULTS",
    "DEFAULT_KAFKA_CLIENT",
    "KAFKA_CLIENTS",
    "PRODUCER_DEFAULTS",
    "Consumer",
    "KafkaReader",
    "RecordProducer",
    "RecordTooLarge",
    "TopicPartition",
    "bootstrap_failure",
    "check_kafka_client",
    "client_config",
    "consumer_factory",
    "consumer_settings",
    "is_collateral",
    "is_refusal",
    "is_retriable",
    "producer_settings",
    "publish_failure",
    "sasl_problem",
    "tls_problem",
    "to_message",
    "unknown_kafka_settings",
]
