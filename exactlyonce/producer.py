"""A stubborn, idempotent producer: the sending half of a reliable link.

Over a lossy link a sender retransmits until acknowledged; the receiver drops
the copies by their identity. Here every record carries a ``message-id``
header (the caller's, or a new time-ordered ID), Kafka's idempotent producer
(``acks=all``) removes the copies of its own internal retries, and records
that still fail (the broker unreachable past ``delivery_timeout_ms``) are
sent again, with backoff, until acknowledged or the retry budget runs out.
The worst a lost acknowledgement causes is a duplicate, which an exactlyonce
consumer skips; never a loss.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from exactlyonce import _kafka, ids, settings
from exactlyonce.errors import ConfigurationError, TransientError
from exactlyonce.ids import DEFAULT_HEADER
from exactlyonce.retry import Retry
from exactlyonce.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SigningKey,
    resolve_signing_key,
    sign,
)

log = logging.getLogger(__name__)


#: The error of a record abandoned with a stuck client (retriable: the next round re-sends it).
_STUCK = TimeoutError("no outcome from a stuck Kafka client, which was replaced")


def new_message_id() -> str:
    """A new unique, time-ordered message ID (a UUID version 7, RFC 9562).

    The first 48 bits are the Unix time in milliseconds, so IDs sort by
    creation time; the rest is random.
    """
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def encode_value(value: bytes | str | Any) -> bytes:
    """Bytes as they are, text as UTF-8, anything else as compact JSON with sorted keys.

    Sorted keys make a re-send of the same object byte-identical, so consumers
    see the same payload fingerprint.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def stamp_headers(
    message_id: str,
    key: bytes | None,
    value: bytes,
    headers: Iterable[tuple[str, bytes]],
    signing_key: SigningKey | None,
) -> list[tuple[str, bytes]]:
    """A record's headers as sent: the caller's, then ``message-id``, then the signature if signing."""
    # Ours replace the caller's: one message-id (and signature) per record,
    # so the consumer never has to guess which copy counts.
    ours = {DEFAULT_HEADER, SIGNATURE_HEADER, KEY_ID_HEADER} if signing_key else {DEFAULT_HEADER}
    stamped = [(name, data) for name, data in headers if name not in ours]
    stamped.append((DEFAULT_HEADER, message_id.encode("utf-8")))
    if signing_key is not None:
        stamped += sign(message_id, key, value, signing_key)
    return stamped



@dataclass(slots=True)
class _Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int | None
    message_id: str
    future: Any = field(default=None)


class Producer:
    """Send records with stable message IDs, retransmitting until acknowledged.

    ``send`` returns at once with the record's message ID; ``flush`` waits for
    every acknowledgement and re-sends what failed. ``config`` is forwarded to
    kafka-python's ``KafkaProducer`` over ``acks="all"`` and
    ``enable_idempotence=True``; ``retry`` bounds the re-sends (default: 5
    rounds, backoff from 0.5 s to 10 s).

    ``signing_key``: ``(key id, secret)``; every record then carries the
    headers of :func:`exactlyonce.signing.sign` over its message ID, key and
    value, so a consumer holding the secret can tell it from a forgery.
    Default: ``EXACTLYONCE_SIGNING_KEY`` (``key-id:secret``) if set, else
    records are not signed. ``sign=False`` never signs and passes the
    caller's signature headers through unchanged (``exactlyonce dlq replay``
    re-sends records with the signature their sender gave them).
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        retry: Retry | None = None,
        signing_key: SigningKey | None = None,
        sign: bool = True,
    ) -> None:
        # Checked first: a bad key is a configuration error even with no broker.
        if not sign:
            if signing_key is not None:
                raise ConfigurationError("signing_key and sign=False contradict each other")
            self._signing_key: SigningKey | None = None
        else:
            self._signing_key = resolve_signing_key(signing_key)
        servers = settings.bootstrap_servers(bootstrap_servers)
        self._retry = retry or Retry(attempts=5, backoff=timedelta(seconds=0.5), max_backoff=timedelta(seconds=10))
        self._servers, self._config = servers, dict(config or {})
        self._producer = self._new_client()
        self._pending: list[_Outgoing] = []

    def send(
        self,
        topic: str,
        value: bytes | str | Any,
        *,
        key: bytes | str | None = None,
        message_id: str | None = None,
        headers: Iterable[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> str:
        """Queue one record and return its message ID (``message_id`` or a new one).

        ``value``: bytes, text, or a JSON-serialisable object (see
        :func:`encode_value`). The ID goes in the ``message-id`` header.
        """
        message_id = new_message_id() if message_id is None else message_id
        problem = ids.outgoing_problem(message_id)
        if problem is not None:
            # A consumer would dead-letter it (ids.resolve): refuse it here instead.
            raise ConfigurationError(f"message_id {problem}")
        raw_key = key.encode("utf-8") if isinstance(key, str) else key
        raw_value = encode_value(value)
        stamped = stamp_headers(message_id, raw_key, raw_value, headers or (), self._signing_key)
        record = _Outgoing(
            topic=topic,
            key=raw_key,
            value=raw_value,
            headers=stamped,
            partition=partition,
            message_id=message_id,
        )
        self._transmit(record)
        self._pending.append(record)
        return message_id

    def flush(self, timeout: timedelta | None = None) -> None:
        """Wait until every queued record is acknowledged, re-sending failures.

        Raises :class:`~exactlyonce.TransientError` naming the undelivered
        message IDs when the retry budget runs out (send them again later:
        their IDs make the copies harmless), and
        :class:`~exactlyonce.ConfigurationError` for a record the broker will
        never take (too large, invalid topic).

        ``timeout`` bounds the whole wait, re-sends included: the records not
        acknowledged by then are given up as when the budget runs out
        (``TransientError``; they may still arrive). Without it, each round
        ends when every record is acknowledged or has failed (kafka-python's
        ``delivery_timeout_ms``), or 10 s after that with the Kafka client
        replaced when records are stuck without an outcome (docs/producer.md).
        """
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()

        def over() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        def sleep(seconds: float) -> None:
            if deadline is not None:
                seconds = max(min(seconds, deadline - time.monotonic()), 0.0)
            time.sleep(seconds)

        retrying = self._retry.retrying(
            retryable=lambda exc: isinstance(exc, TransientError) and not over(), sleep=sleep
        )
        try:
            retrying(lambda: self._flush_once(deadline))
        except TransientError as exc:
            undelivered = [r.message_id for r in self._pending]
            self._pending = []
            raise TransientError(f"{len(undelivered)} record(s) not acknowledged: {undelivered[:10]}") from exc

    def _flush_once(self, deadline: float | None = None) -> None:
        # Re-send what failed last round, then wait for every outcome (a record
        # still unacknowledged when the wait ends counts as failed).
        for record in self._pending:
            if record.future is None:
                self._transmit(record)
        abandoned = self._wait(deadline)
        failed: list[tuple[_Outgoing, BaseException]] = []
        refused: list[tuple[_Outgoing, BaseException]] = []
        for record in self._pending:
            if id(record) in abandoned:
                # Its future is the closed client's, which failed it as closed: sent again whatever it says.
                record.future = None
                failed.append((record, _STUCK))
                continue
            error = self._producer.outcome(record.future)
            if error is None:
                continue
            record.future = None
            (failed if _kafka.is_retriable(error) else refused).append((record, error))
        # A refused record is dropped from the queue, so the next flush does not
        # raise for it again; the retriable ones stay queued.
        self._pending = [record for record, _ in failed]
        if refused:
            record, error = refused[0]
            raise ConfigurationError(
                f"{len(refused)} record(s) refused by the broker, first {record.message_id}: {error}"
            ) from error
        if failed:
            raise TransientError(f"{len(failed)} record(s) not acknowledged, first: {failed[0][1]}")

    def _wait(self, deadline: float | None) -> set[int]:
        """Wait for every record's outcome, until ``deadline`` (monotonic) if given; return the ``id()`` of the
        records abandoned with a stuck client (none, usually).

        kafka-python gives every record an outcome within ``delivery_timeout_ms``
        of its send; but its idempotent producer was seen (in the cluster chaos
        test, after broker restarts) to leave records without one for good: its
        sender expires batches only on the path it skips while it waits for a
        producer ID. A plain wait then never ends. Past
        :attr:`~exactlyonce._kafka.RecordProducer.stall_s`
        the client is replaced: the records without an outcome count as failed
        and the next round re-sends them on the new client (a copy the old one
        still delivers is a duplicate under the same message ID).
        """
        limit = self._producer.stall_s
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
            if limit <= 0:
                return set()
        if self._producer.flush(limit) or (deadline is not None and time.monotonic() >= deadline):
            return set()
        stuck = {id(r) for r in self._pending if r.future is not None and not r.future.is_done}
        if not stuck:
            return set()
        try:
            fresh = self._new_client()
        except TransientError as exc:
            log.warning("producer: %d record(s) without an outcome after %.0f s, and no new Kafka client yet "
                        "(%s)", len(stuck), limit, exc)
            return set()
        log.warning("producer: %d record(s) without an outcome after %.0f s; replacing the Kafka client",
                    len(stuck), limit)
        old, self._producer = self._producer, fresh
        old.close(0.0)  # fails the stuck records as closed (not retriable): they are marked abandoned instead
        return stuck

    def _new_client(self) -> _kafka.RecordProducer:
        return _kafka.RecordProducer(bootstrap_servers=self._servers, config=self._config)

    def _transmit(self, record: _Outgoing) -> None:
        record.future = self._producer.send(
            record.topic, key=record.key, value=record.value, headers=record.headers, partition=record.partition
        )

    def close(self, timeout: timedelta | None = None) -> None:
        """Flush (for at most ``timeout``), then close the connection.

        With a ``timeout``, what is still unacknowledged when it passes is
        abandoned (``flush`` raises ``TransientError`` for it) and the
        connection is closed at once.
        """
        try:
            self.flush(timeout)
        finally:
            self._producer.close(10.0 if timeout is None else 0.0)

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._producer.close()
