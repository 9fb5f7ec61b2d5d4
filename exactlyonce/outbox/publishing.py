"""Writing an outbox row (:func:`publish`), and the parts of its format the relay reads back.

A row holds its record as the relay will send it (key and value encoded,
the extra headers as JSON, the message ID apart) and its ``ordering_key``: a
digest of the topic and key, the unit of order the relay keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import ids, settings
from exactlyonce.errors import ConfigurationError
from exactlyonce.ids import DEFAULT_HEADER
from exactlyonce.message import headers_from_json, headers_to_json
from exactlyonce.producer import encode_value, new_message_id
from exactlyonce.storage.schema import outbox


def publish(
    session: Session | sa.Connection,
    topic: str,
    value: bytes | str | Any,
    *,
    key: bytes | str | None = None,
    message_id: str | None = None,
    headers: Iterable[tuple[str, bytes]] | None = None,
) -> str:
    """Store a record for ``topic`` in the outbox, in the session's transaction; return its message ID.

    The row commits or rolls back with the caller's transaction (in a
    handler: with its writes and the dedup row), so the record is sent if and
    only if they committed. Nothing is sent here: a :class:`Relay` (run by
    ``App.run()`` and by ``exactlyonce relay``) sends it after the commit, at
    least once, with ``message_id`` (default: a new time-ordered ID) in its
    ``message-id`` header. ``value`` and ``key`` are encoded as
    :meth:`Producer.send <exactlyonce.Producer.send>` encodes them.

    Records with the same topic and key reach Kafka in the order they were
    published, within a transaction and across transactions that commit one
    after the other (the relay follows the outbox's ``id`` order). Concurrent
    transactions get no such order: ``id`` is assigned at insert, not at
    commit, so on PostgreSQL and MySQL/MariaDB a row of the transaction that
    commits last may be sent after a row with a larger ``id`` that was sent
    already. Serialise such writers (lock a row per key) where it matters.
    """
    settings.check_topic(topic)
    message_id = new_message_id() if message_id is None else message_id
    problem = ids.outgoing_problem(message_id)
    if problem is not None:
        # A consumer would dead-letter it (ids.resolve): refuse it here instead.
        raise ConfigurationError(f"message_id {problem}")
    extra = []
    for name, data in headers or ():
        if not isinstance(name, str) or not isinstance(data, bytes):
            raise ConfigurationError(f"headers must be (str, bytes) pairs, got {(name, data)!r}")
        if name != DEFAULT_HEADER:
            extra.append((name, data))
    raw_key = key.encode("utf-8") if isinstance(key, str) else key
    session.execute(
        sa.insert(outbox).values(
            topic=topic,
            key=raw_key,
            value=encode_value(value),
            headers=headers_to_json(extra),
            message_id=message_id,
            ordering_key=ordering_key(topic, raw_key),
            created_at=settings.utcnow(),
            sent_at=None,
        )
    )
    return message_id


def ordering_key(topic: str, key: bytes | None) -> str:
    """The digest of a row's topic and key: rows with the same one are sent in ``id`` order."""
    # Topic names cannot hold "\0", and a null key differs from every key.
    tail = b"\0k" + key if key is not None else b"\0n"
    return hashlib.sha256(topic.encode("ascii") + tail).hexdigest()


def decode_headers(text: str) -> list[tuple[str, bytes]]:
    """A row's extra headers (its ``headers`` column), as the record carries them."""
    return list(headers_from_json(text))
