"""The bounded copy a dead letter too large for its topic becomes: small whatever the record, and marked."""

from __future__ import annotations

from exactlyonce import Message
from exactlyonce.admin import replay_problem, to_dead_letter
from exactlyonce.runtime.deadletter import bounded_copy as _bounded_copy
from exactlyonce.runtime.deadletter import size as _size

OURS = [("x-exactlyonce-reason", b"handler-error"), ("x-exactlyonce-error-message", "é".encode() * 2000)]


def _message(key: bytes | None, value: bytes | None, headers: tuple[tuple[str, bytes], ...]) -> Message:
    return Message(topic="t", partition=0, offset=5, key=key, value=value, headers=headers)


def test_small_key_and_headers_are_kept_and_the_value_is_cut() -> None:
    """The value's first 1024 bytes, the key and original headers as they were, our headers cut to 1000 bytes."""
    key, value, headers = _bounded_copy(_message(b"k", b"v" * 100_000, (("message-id", b"m-1"),)), OURS)
    assert key == b"k" and value == b"v" * 1024
    names = [name for name, _ in headers]
    assert names == ["message-id", "x-exactlyonce-reason", "x-exactlyonce-error-message",
                     "x-exactlyonce-value-truncated"]
    assert dict(headers)["x-exactlyonce-value-truncated"] == b"100000"
    assert len(dict(headers)["x-exactlyonce-error-message"]) == 1000


def test_a_large_key_and_large_headers_are_omitted_and_counted() -> None:
    """Whatever made the record large, the copy stays small."""
    big_headers = tuple((f"h{n}", b"x" * 1000) for n in range(20))
    key, value, headers = _bounded_copy(_message(b"k" * 5000, None, big_headers), OURS)
    assert key is None and value is None
    marks = {name: data for name, data in headers if name.startswith("x-exactlyonce-") and name not in dict(OURS)}
    assert marks == {"x-exactlyonce-value-truncated": b"0", "x-exactlyonce-key-omitted": b"5000",
                     "x-exactlyonce-headers-omitted": b"20"}
    assert _size(key, value, headers) < 4096


def test_a_bounded_copy_is_never_replayed() -> None:
    """`dlq replay` refuses it: its value is not the message."""
    _, value, headers = _bounded_copy(_message(None, b"v" * 5000, (("message-id", b"m-1"),)),
                                      [*OURS, ("x-exactlyonce-topic", b"t")])
    record = Message(topic="t.dlq", partition=0, offset=0, key=None, value=value, headers=tuple(headers))
    assert "truncated" in (replay_problem(to_dead_letter(record)) or "")
