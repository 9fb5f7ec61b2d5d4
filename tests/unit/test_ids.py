"""Message-ID strategies and the checks every ID passes."""

from __future__ import annotations

import pytest

from exactlyonce import Message, MessageDecodeError, ids
from exactlyonce.errors import InvalidMessageId


def make(value: bytes | None = b"{}", key: bytes | None = None,
         headers: tuple[tuple[str, bytes], ...] = ()) -> Message:
    return Message(topic="t", partition=0, offset=3, key=key, value=value, headers=headers)


def test_header_strategy_reads_the_message_id_header_by_default() -> None:
    """The default strategy reads the `message-id` header."""
    assert ids.resolve(ids.header(), make(headers=(("message-id", b"abc"),))) == "abc"


def test_header_strategy_reads_a_named_header() -> None:
    """header(name) reads that header."""
    assert ids.header("x-id")(make(headers=(("x-id", b"42"),))) == "42"


@pytest.mark.parametrize("headers", [(), (("message-id", b"\xff"),)])
def test_header_strategy_rejects_missing_or_non_utf8(headers: tuple[tuple[str, bytes], ...]) -> None:
    """A missing or non-UTF-8 header is an InvalidMessageId."""
    with pytest.raises(InvalidMessageId):
        ids.header()(make(headers=headers))


def test_json_field_reads_dotted_paths_and_integers() -> None:
    """json_field follows dotted paths and accepts integer IDs as their decimal text."""
    assert ids.json_field("meta.id")(make(b'{"meta": {"id": "x-1"}}')) == "x-1"
    assert ids.json_field("n")(make(b'{"n": 12}')) == "12"


@pytest.mark.parametrize("value", [b'{"id": 1.5}', b'{"id": true}', b'{"id": null}', b'{"id": [1]}',
                                   b"{}", b"[]"])
def test_json_field_rejects_unstable_or_missing_values(value: bytes) -> None:
    """Floats, booleans, null, containers and missing fields are not IDs."""
    with pytest.raises(InvalidMessageId):
        ids.json_field("id")(make(value))


def test_json_field_propagates_decode_errors() -> None:
    """A non-JSON value is a MessageDecodeError, not an ID error."""
    with pytest.raises(MessageDecodeError):
        ids.resolve(ids.json_field("id"), make(b"nope"))


def test_json_field_rejects_bad_paths() -> None:
    """An empty path segment is a programming error caught at registration."""
    with pytest.raises(ValueError):
        ids.json_field("a..b")


def test_key_strategy() -> None:
    """key() uses the UTF-8 record key and rejects a null key."""
    assert ids.key()(make(key=b"acct-1")) == "acct-1"
    with pytest.raises(InvalidMessageId):
        ids.key()(make(key=None))


def test_resolve_rejects_empty_and_over_long_ids_without_truncating() -> None:
    """IDs must be 1..255 characters; longer ones are refused, never cut."""
    assert ids.resolve(lambda m: "x" * 255, make()) == "x" * 255
    with pytest.raises(InvalidMessageId, match="256 characters"):
        ids.resolve(lambda m: "x" * 256, make())
    with pytest.raises(InvalidMessageId, match="empty"):
        ids.resolve(lambda m: "", make())


def test_resolve_rejects_non_string_ids() -> None:
    """A custom strategy returning a non-str is refused."""
    with pytest.raises(InvalidMessageId, match="must be str"):
        ids.resolve(lambda m: 5, make())  # type: ignore[arg-type,return-value]


def test_resolve_turns_a_failing_custom_strategy_into_invalid_id() -> None:
    """A lambda raising KeyError on a record without the field is bad input, not a crash."""
    with pytest.raises(InvalidMessageId, match="KeyError"):
        ids.resolve(lambda m: m.json()["transfer_id"], make(b"{}"))
