"""The record a handler receives."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from exactlyonce.errors import MessageDecodeError

_UNSET: Any = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One Kafka record, as delivered to a handler.

    ``value`` and ``key`` are the raw bytes (``None`` for a null key or a
    tombstone); ``headers`` keeps Kafka's order and allows repeated names.
    ``payload`` is the typed payload of a handler registered with ``model=``:
    the value decoded as JSON and validated into that model (an instance of
    it) once, before anything is claimed; ``None`` for a handler without
    ``model=``. Like the value it comes from, it takes no part in equality.
    To unit-test a typed handler, build the message with both:
    ``Message(..., value=raw, payload=Transfer(...))``.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None
    payload: Any = field(default=None, repr=False, compare=False)
    _json: Any = field(default=_UNSET, init=False, repr=False, compare=False)

    def header(self, name: str) -> bytes | None:
        """Return the last header called ``name``, or ``None`` if there is none."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def json(self) -> Any:
        """Return the value decoded as UTF-8 JSON (decoded once, then cached).

        Raises :class:`~exactlyonce.errors.MessageDecodeError` when the value is
        missing or is not valid JSON.
        """
        if self._json is _UNSET:
            if self.value is None:
                raise MessageDecodeError(f"{self.where()}: value is null, expected JSON")
            try:
                decoded = json.loads(self.value)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MessageDecodeError(f"{self.where()}: value is not valid JSON: {exc}") from exc
            object.__setattr__(self, "_json", decoded)
        return self._json

    def fingerprint(self) -> str:
        """Return the SHA-256 hex digest of the value (of ``b""`` for a tombstone)."""
        return hashlib.sha256(self.value or b"").hexdigest()

    def where(self) -> str:
        """Return ``topic[partition]@offset``, for log lines and errors."""
        return f"{self.topic}[{self.partition}]@{self.offset}"


def with_payload(message: Message, payload: Any) -> Message:
    """``message`` with ``payload`` set, its decoded JSON (if any) kept, so the value is decoded once."""
    typed = dataclasses.replace(message, payload=payload)
    object.__setattr__(typed, "_json", message._json)
    return typed


def headers_to_json(headers: Iterable[tuple[str, bytes]]) -> str:
    """Headers as JSON text for a database column: ``[[name, base64 of the value], ...]``, order kept."""
    return json.dumps([[name, base64.b64encode(value).decode("ascii")] for name, value in headers])


def headers_from_json(text: str) -> tuple[tuple[str, bytes], ...]:
    """The inverse of :func:`headers_to_json`."""
    return tuple((name, base64.b64decode(data)) for name, data in json.loads(text))
