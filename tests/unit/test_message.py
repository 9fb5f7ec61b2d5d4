"""Message: a frozen view of one record."""

from __future__ import annotations

import hashlib
from dataclasses import FrozenInstanceError

import pytest

from exactlyonce import Message, MessageDecodeError


def make(value: bytes | None = b'{"a": 1}', **kwargs: object) -> Message:
    fields: dict[str, object] = {"topic": "t", "partition": 1, "offset": 7, "key": b"k", "value": value}
    fields.update(kwargs)
    return Message(**fields)  # type: ignore[arg-type]


def test_json_decodes_value() -> None:
    """json() returns the decoded UTF-8 JSON value."""
    assert make().json() == {"a": 1}


@pytest.mark.parametrize("value", [b"not json", b"\xff\xfe", None])
def test_json_rejects_bad_values_with_message_error(value: bytes | None) -> None:
    """json() raises MessageDecodeError, naming the record, for non-JSON or null values."""
    with pytest.raises(MessageDecodeError, match=r"t\[1\]@7"):
        make(value).json()


def test_json_is_cached() -> None:
    """json() decodes once: the same object comes back."""
    message = make()
    assert message.json() is message.json()


def test_message_is_frozen() -> None:
    """Messages are immutable values."""
    with pytest.raises(FrozenInstanceError):
        make().offset = 8  # type: ignore[misc]


def test_header_returns_last_of_repeated_names() -> None:
    """header() returns the last value of a repeated header, None when absent."""
    message = make(headers=(("h", b"1"), ("h", b"2")))
    assert message.header("h") == b"2"
    assert message.header("missing") is None


def test_fingerprint_is_sha256_of_value() -> None:
    """fingerprint() is the SHA-256 of the value, and of b'' for a tombstone."""
    assert make(b"x").fingerprint() == hashlib.sha256(b"x").hexdigest()
    assert make(None).fingerprint() == hashlib.sha256(b"").hexdigest()


def test_equality_ignores_the_json_cache() -> None:
    """Two messages with the same fields are equal whether or not json() was called."""
    a, b = make(), make()
    a.json()
    assert a == b
