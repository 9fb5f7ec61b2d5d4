"""Which Kafka client the worker's consumer runs on: ``App(kafka_client=...)``.

``"kafka-python"`` (the default, a dependency) or ``"confluent"``
(confluent-kafka, on librdkafka: the ``exactlyonce[confluent]`` extra).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from exactlyonce._kafka.clients import Consumer
from exactlyonce.errors import ConfigurationError

__all__ = ["DEFAULT_KAFKA_CLIENT", "KAFKA_CLIENTS", "check_kafka_client", "consumer_factory"]

DEFAULT_KAFKA_CLIENT = "kafka-python"
#: The clients the worker's consumer can run on.
KAFKA_CLIENTS = ("kafka-python", "confluent")


def check_kafka_client(name: object) -> str:
    """``name`` if it is a client the consumer can run on and that is installed, else ``ConfigurationError``."""
    if name not in KAFKA_CLIENTS:
        raise ConfigurationError(f"unknown kafka_client {name!r}: choose one of {', '.join(map(repr, KAFKA_CLIENTS))}")
    if name == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
        raise ConfigurationError("kafka_client='confluent' needs confluent-kafka: pip install 'exactlyonce[confluent]'")
    return str(name)


def consumer_factory(name: str) -> Callable[..., Any]:
    """The class of the consumer that runs on client ``name`` (called with :class:`Consumer`'s keywords)."""
    if check_kafka_client(name) == "confluent":
        # Imported here: confluent-kafka is an optional extra.
        from exactlyonce._kafka.confluent import ConfluentConsumer

        return ConfluentConsumer
    return Consumer
