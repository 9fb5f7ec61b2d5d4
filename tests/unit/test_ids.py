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


# -- IDs every database can store exactly (a poison ID must be dead-lettered, not crash the worker) --


def test_json_field_with_an_escaped_lone_surrogate_is_refused() -> None:
    """``{"id": "\\ud800"}`` decodes to a lone surrogate no driver can encode: refused before any claim."""
    with pytest.raises(InvalidMessageId, match="lone surrogate"):
        ids.resolve(ids.json_field("id"), make(b'{"id": "a\\ud800"}'))


@pytest.mark.parametrize("raw", [b"a\x00b", b"\x1b[2Jx", b"line\nbreak", b"tab\there", b"del\x7f",
                                 "c1\u0085".encode()])
def test_ids_with_control_characters_are_refused(raw: bytes) -> None:
    """NUL (which PostgreSQL cannot store) and the other control characters are refused."""
    with pytest.raises(InvalidMessageId, match="control character"):
        ids.resolve(ids.header(), make(headers=(("message-id", raw),)))


def test_ids_starting_with_the_reserved_prefix_are_refused() -> None:
    """``@...`` is the namespace of IDs recorded under coordinates: a sender cannot claim one."""
    with pytest.raises(InvalidMessageId, match="reserved"):
        ids.resolve(ids.header(), make(headers=(("message-id", b"@t/0/3"),)))
    assert ids.resolve(ids.header(), make(headers=(("message-id", b"a@t/0/3"),))) == "a@t/0/3"


def test_the_length_limit_counts_characters_not_bytes() -> None:
    """255 four-byte characters fit (a VARCHAR(255) holds 255 characters on every database); 256 do not."""
    assert ids.resolve(lambda m: "\U0001f600" * 255, make()) == "\U0001f600" * 255
    with pytest.raises(InvalidMessageId, match="256 characters"):
        ids.resolve(lambda m: "\U0001f600" * 256, make())


@pytest.mark.parametrize("text", ["order-1", "Order-1 ", "\uffff", "\u00e9\u200d\U0001f600", "a" * 255])
def test_ordinary_unicode_ids_are_accepted(text: str) -> None:
    """Trailing spaces, non-characters, joiners and astral characters are stored exactly everywhere."""
    assert ids.text_problem(text, ids.MAX_MESSAGE_ID_LENGTH) is None
    assert ids.resolve(lambda m: text, make()) == text
