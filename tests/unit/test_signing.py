"""HMAC signing of records: what verifies, what does not, and that secrets never show."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
from typing import Any

import pytest

from exactlyonce import ConfigurationError, Message, Producer
from exactlyonce.errors import BadSignature, MessageError
from exactlyonce.outbox import Relay
from exactlyonce.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    Secret,
    check_signing_key,
    check_verification_keys,
    sign,
    signed_parts,
    signing_key_from_env,
    verification_keys_from_env,
    verify,
)

SECRET = b"s3cret-0123456789-abcdef"
OTHER_SECRET = b"another-secret-9876543210"
KEY = ("k1", SECRET)
KEYS = {"k1": SECRET}


def _message(message_id: str | None, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None) -> Message:
    stamped = [] if message_id is None else [("message-id", message_id.encode())]
    return Message(topic="t", partition=0, offset=7, key=key, value=value,
                   headers=tuple([("trace", b"x"), *stamped, *(headers or [])]))


_SAME: Any = object()


def _signed(message_id: str, key: bytes | None, value: bytes | None, signing_key: tuple[str, bytes] = KEY,
            *, as_id: str | None = None, as_key: Any = _SAME, as_value: Any = _SAME) -> Message:
    """Sign (message_id, key, value), then deliver it with the ID, key or value possibly replaced."""
    headers = sign(message_id, key, value, signing_key)
    return _message(as_id or message_id, key if as_key is _SAME else as_key,
                    value if as_value is _SAME else as_value, headers)


def test_sign_gives_the_key_id_and_a_hex_hmac_sha256() -> None:
    """Two headers; the signature is HMAC-SHA256 (hex) under the named key, deterministic."""
    headers = sign("id-1", b"k", b"v", KEY)
    assert [name for name, _ in headers] == [KEY_ID_HEADER, SIGNATURE_HEADER]
    assert KEY_ID_HEADER == "exactlyonce-key-id" and SIGNATURE_HEADER == "exactlyonce-signature"
    assert dict(headers)[KEY_ID_HEADER] == b"k1"
    mac = dict(headers)[SIGNATURE_HEADER]
    assert len(mac) == 64 and int(mac, 16) >= 0
    assert sign("id-1", b"k", b"v", KEY) == headers
    assert sign("id-1", b"k", b"v", ("k1", OTHER_SECRET)) != headers
    # Not a bare HMAC of the value (nor of a naive concatenation): the input is framed.
    assert mac.decode() != hmac.new(SECRET, b"v", hashlib.sha256).hexdigest()
    assert mac.decode() != hmac.new(SECRET, b"id-1kv", hashlib.sha256).hexdigest()


def test_a_genuine_record_verifies() -> None:
    """Signed ID, key and value, delivered unchanged (other headers around them): accepted."""
    verify(_signed("id-1", b"key", b'{"amount": 5}'), KEYS)
    verify(_signed("id-2", None, None), KEYS)
    verify(_signed("é-unicode-id", b"", b""), KEYS)


@pytest.mark.parametrize(
    ("change", "delivered"),
    [
        ("value", {"as_value": b'{"amount": 500}'}),
        ("key", {"as_key": b"other-key"}),
        ("message id", {"as_id": "id-2"}),
        ("value to null", {"as_value": None}),
        ("key to null", {"as_key": None}),
    ],
)
def test_a_tampered_record_is_rejected(change: str, delivered: dict[str, object]) -> None:
    """Any change of the ID, the key or the value after signing breaks the signature."""
    message = _signed("id-1", b"key", b'{"amount": 5}', **delivered)  # type: ignore[arg-type]
    with pytest.raises(BadSignature, match="does not match") as caught:
        verify(message, KEYS)
    assert isinstance(caught.value, MessageError) and caught.value.reason == "bad-signature"


def test_null_and_empty_fields_and_moved_bytes_sign_differently() -> None:
    """The encoding is unambiguous: null vs empty, and bytes shifted between fields, give other MACs."""
    triples = [
        ("id", None, None), ("id", b"", None), ("id", None, b""), ("id", b"", b""),
        ("id", b"ab", b"c"), ("id", b"a", b"bc"), ("id", None, b"abc"), ("id", b"abc", None),
        ("ida", b"b", b"c"), ("i", b"dab", b"c"), ("id", b"\x00", None),
    ]
    macs = [dict(sign(*triple, KEY))[SIGNATURE_HEADER] for triple in triples]
    assert len(set(macs)) == len(triples)
    for signed, delivered in itertools.permutations(triples, 2):
        if signed[0] != delivered[0]:
            continue
        message = _signed(*signed, as_key=delivered[1], as_value=delivered[2])
        with pytest.raises(BadSignature):
            verify(message, KEYS)


def test_a_record_signed_with_another_secret_under_the_same_key_id_is_rejected() -> None:
    """A forger who knows the key id but not the secret fails."""
    with pytest.raises(BadSignature, match="does not match"):
        verify(_signed("id-1", b"k", b"v", ("k1", OTHER_SECRET)), KEYS)


def test_an_unknown_key_id_is_rejected_by_name() -> None:
    """The error names the unknown key id and the known ones (ids only)."""
    with pytest.raises(BadSignature, match=r"unknown key id 'k9' \(known: \['k1'\]\)"):
        verify(_signed("id-1", b"k", b"v", ("k9", SECRET)), KEYS)


def test_rotation_accepts_both_keys_while_both_are_configured() -> None:
    """During a rotation consumers hold old and new keys; afterwards the old one is refused."""
    old, new = ("2025", SECRET), ("2026", OTHER_SECRET)
    both = dict([old, new])
    verify(_signed("a", b"k", b"v", old), both)
    verify(_signed("b", b"k", b"v", new), both)
    with pytest.raises(BadSignature, match="unknown key id '2025'"):
        verify(_signed("a", b"k", b"v", old), dict([new]))
    # The key id selects the secret: claiming the other id does not help.
    forged = _message("c", b"k", b"v", [(KEY_ID_HEADER, b"2026"), sign("c", b"k", b"v", old)[1]])
    with pytest.raises(BadSignature, match="does not match"):
        verify(forged, both)


@pytest.mark.parametrize(
    ("headers", "message_id", "expected"),
    [
        ([], "id-1", "unsigned: no 'exactlyonce-signature' header"),
        ([(SIGNATURE_HEADER, b"0" * 64)], "id-1", "no 'exactlyonce-key-id' header"),
        ([(KEY_ID_HEADER, b"k1"), (SIGNATURE_HEADER, b"xyz")], "id-1", "malformed 'exactlyonce-signature'"),
        ([(KEY_ID_HEADER, b"k1"), (SIGNATURE_HEADER, b"A" * 64)], "id-1", "malformed"),
        ([(KEY_ID_HEADER, b"k1"), (SIGNATURE_HEADER, b"0" * 64)], None, "no 'message-id' header"),
        ([(KEY_ID_HEADER, b"k1"), (SIGNATURE_HEADER, b"0" * 64)], "id-1", "does not match"),
        ([(KEY_ID_HEADER, b"k1"), (SIGNATURE_HEADER, b"0" * 64), (SIGNATURE_HEADER, b"0" * 64)], "id-1",
         "2 'exactlyonce-signature' headers"),
        ([(KEY_ID_HEADER, b"\xff\x00"), (SIGNATURE_HEADER, b"0" * 64)], "id-1", "unknown key id"),
    ],
)
def test_each_way_of_being_unsigned_or_malformed_has_its_own_message(
    headers: list[tuple[str, bytes]], message_id: str | None, expected: str
) -> None:
    """The error says what is wrong, and where (topic[partition]@offset)."""
    with pytest.raises(BadSignature, match="^t\\[0\\]@7: .*" + expected.replace("(", r"\(")):
        verify(_message(message_id, b"k", b"v", headers), KEYS)


def test_a_repeated_message_id_header_is_rejected() -> None:
    """Which of two message-id headers was signed would be ambiguous: refuse the record."""
    message = _signed("id-1", b"k", b"v")
    doubled = Message(topic="t", partition=0, offset=7, key=b"k", value=b"v",
                      headers=(*message.headers, ("message-id", b"id-2")))
    with pytest.raises(BadSignature, match="2 'message-id' headers"):
        verify(doubled, KEYS)


def test_key_validation() -> None:
    """Key ids: 1-64 printable ASCII without space, ':' or ','. Secrets: at least 16 bytes; text is UTF-8."""
    assert check_signing_key(("key-2026.01_a", "x" * 16)) == ("key-2026.01_a", b"x" * 16)
    for bad_id in ["", "a:b", "a,b", "a b", "é", "x" * 65, b"k1", None]:
        with pytest.raises(ConfigurationError, match="key id"):
            check_signing_key((bad_id, SECRET))
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        check_signing_key(("k1", b"short"))
    with pytest.raises(ConfigurationError, match="tuple"):
        check_signing_key("k1:" + SECRET.decode())
    with pytest.raises(ConfigurationError, match="at least one key"):
        check_verification_keys({})
    # Text secrets are accepted everywhere, and sign the same as their UTF-8 bytes.
    assert sign("i", None, b"v", ("k1", SECRET.decode())) == sign("i", None, b"v", KEY)  # type: ignore[arg-type]
    verify(_signed("i", None, b"v"), {"k1": SECRET.decode()})  # type: ignore[dict-item]


def test_env_parsing() -> None:
    """EXACTLYONCE_SIGNING_KEY is 'id:secret'; EXACTLYONCE_SIGNING_KEYS is 'id1:s1,id2:s2'; unset is None."""
    assert signing_key_from_env({}) is None
    assert signing_key_from_env({"EXACTLYONCE_SIGNING_KEY": "  "}) is None
    key = signing_key_from_env({"EXACTLYONCE_SIGNING_KEY": "k1:abc:def-0123456789"})
    assert key == ("k1", b"abc:def-0123456789")  # the secret is all after the first ':'
    assert verification_keys_from_env({}) is None
    keys = verification_keys_from_env(
        {"EXACTLYONCE_SIGNING_KEYS": f"old:{SECRET.decode()}, new:{OTHER_SECRET.decode()}"})
    assert keys == {"old": SECRET, "new": OTHER_SECRET}
    # A key from the environment signs what keys from the environment verify.
    assert key is not None
    verify(_signed("i", None, b"v", key), {"k1": b"abc:def-0123456789"})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"EXACTLYONCE_SIGNING_KEY": "no-colon-here-0123456789"}, "EXACTLYONCE_SIGNING_KEY must have the form"),
        ({"EXACTLYONCE_SIGNING_KEY": ":only-a-secret-0123456789"}, "must have the form"),
        ({"EXACTLYONCE_SIGNING_KEY": "k1:too-short"}, "secret of signing key 'k1' must have at least 16"),
        ({"EXACTLYONCE_SIGNING_KEY": "bad id:long-enough-secret-1234"}, "key id must be"),
        ({"EXACTLYONCE_SIGNING_KEYS": "a:long-enough-secret-1234,b"}, "entry 2 of EXACTLYONCE_SIGNING_KEYS"),
        ({"EXACTLYONCE_SIGNING_KEYS": "a:long-enough-secret-1234,a:long-enough-secret-5678"}, "appears twice"),
        ({"EXACTLYONCE_SIGNING_KEYS": "a:long-enough-secret-1234,b:short-secret"}, "entry 2 .* 'b' .* 16"),
    ],
)
def test_env_errors_name_the_problem_never_the_secret(environ: dict[str, str], expected: str) -> None:
    """Malformed variables raise ConfigurationError saying what is wrong, without the secret text."""
    parse = signing_key_from_env if "EXACTLYONCE_SIGNING_KEY" in environ else verification_keys_from_env
    with pytest.raises(ConfigurationError, match=expected) as caught:
        parse(environ)
    text = f"{caught.value!s} {caught.value!r} {caught.value.__context__!r} {caught.value.__cause__!r}"
    for fragment in ("secret-1234", "secret-5678", "too-short", "short-secret", "only-a-secret", "no-colon-here"):
        assert fragment not in text


def test_secrets_never_show_in_repr_str_or_errors(caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys as stored, parsed, and inside a Producer or Relay print as <secret>; errors never hold one."""
    secret_text = SECRET.decode()
    monkeypatch.setenv("EXACTLYONCE_SIGNING_KEY", f"k1:{secret_text}")
    monkeypatch.setenv("EXACTLYONCE_SIGNING_KEYS", f"k1:{secret_text},k2:{OTHER_SECRET.decode()}")
    shown: list[str] = []
    key = check_signing_key(KEY)
    env_key = signing_key_from_env()
    env_keys = verification_keys_from_env()
    for value in (key, env_key, env_keys, check_verification_keys(KEYS), Secret(SECRET)):
        shown += [repr(value), str(value), f"{value}", "%s %r" % (value, value)]  # type: ignore[str-bytes-safe]  # noqa: UP031
    assert "<secret>" in repr(key) and isinstance(key[1], bytes) and key[1] == SECRET
    # Inside objects that hold them (a broker address that never answers is not contacted here).
    producer = Producer("127.0.0.1:1", signing_key=KEY, config={"api_version": (2, 5)})
    try:
        shown += [repr(vars(producer)), repr(producer._signing_key)]
    finally:
        producer._producer.close()
    relay = Relay(None, "127.0.0.1:1", signing_key=KEY)  # type: ignore[arg-type]
    shown.append(repr(vars(relay)))
    # Every error verify can raise, with the secret's keys configured.
    for message in [_message("i", b"k", b"v"), _signed("i", b"k", b"v", ("k1", OTHER_SECRET)),
                    _signed("i", b"k", b"v", ("k3", SECRET)), _signed("i", b"k", b"v", as_value=b"w")]:
        with pytest.raises(BadSignature) as caught:
            verify(message, env_keys or {})
        shown += [str(caught.value), repr(caught.value)]
    # Nor the MAC a forger would need: a mismatch error does not reveal the expected signature.
    expected_mac = dict(sign("i", b"k", b"w", KEY))[SIGNATURE_HEADER].decode()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("exactlyonce").info("keys: %s %r", env_keys, env_key)
    shown.append(caplog.text)
    everything = "\n".join(shown)
    for leak in (secret_text, SECRET.hex(), OTHER_SECRET.decode(), expected_mac, repr(SECRET)):
        assert leak not in everything


def test_signed_parts_keep_only_what_the_signature_covers() -> None:
    """The view IDs and sequence numbers are derived from: message-id header, key, value, coordinates."""
    message = Message(topic="t", partition=2, offset=9, key=b"k", value=b"v", timestamp_ms=123,
                      headers=(("x-id", b"a"), ("message-id", b"m-1"), (SIGNATURE_HEADER, b"f" * 64)))
    view = signed_parts(message)
    assert view.headers == (("message-id", b"m-1"),)
    assert (view.topic, view.partition, view.offset, view.key, view.value) == ("t", 2, 9, b"k", b"v")
    assert view.timestamp_ms is None
    assert view.header("x-id") is None and message.header("x-id") == b"a"
