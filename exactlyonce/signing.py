"""Message authentication: an HMAC-SHA256 signature over a record's message ID, key and value.

The dedup table trusts the message ID a record carries. Anyone who can write
to a topic can therefore send a record under an ID that a genuine message will
use later, and the genuine one would then be skipped as a duplicate. A shared
secret closes that hole: the sender adds two headers,

- ``exactlyonce-key-id``: which secret signed the record, so that several
  secrets can be accepted at once while one is rotated out;
- ``exactlyonce-signature``: HMAC-SHA256, in lowercase hex, over the message
  ID, the key and the value,

and the receiver checks them (:func:`verify`) *before* it claims the ID.

The MAC input is a version tag followed by each field as a presence byte and
an 8-byte big-endian length, so no two different (ID, key, value) triples
share an input: a null key differs from an empty one, and bytes cannot move
from the key to the value. The topic, partition and other headers are not
signed: a dead letter replayed onto its original topic still verifies.

Secrets are held as :class:`Secret`, whose ``repr`` and ``str`` are
``<secret>``, so a secret never shows up in a log line, a traceback's locals or
an error message. The header names deliberately lack the ``x-exactlyonce-``
prefix, which is reserved for dead-letter metadata that a replay strips.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Any

from exactlyonce.errors import BadSignature, ConfigurationError
from exactlyonce.ids import DEFAULT_HEADER
from exactlyonce.message import Message
from exactlyonce.settings import SIGNING_KEY_ENV, SIGNING_KEYS_ENV

__all__ = [
    "KEY_ID_HEADER",
    "MIN_SECRET_BYTES",
    "SIGNATURE_HEADER",
    "SIGNED_HEADERS",
    "SIGNING_KEYS_ENV",
    "SIGNING_KEY_ENV",
    "Secret",
    "SigningKey",
    "check_signing_key",
    "check_verification_keys",
    "resolve_signing_key",
    "sign",
    "signed_parts",
    "signing_key_from_env",
    "verification_keys_from_env",
    "verify",
]

#: The header holding the hex HMAC-SHA256 of the record.
SIGNATURE_HEADER = "exactlyonce-signature"
#: The header naming the key that signed the record.
KEY_ID_HEADER = "exactlyonce-key-id"
#: The headers the MAC covers (besides the key and the value).
SIGNED_HEADERS = frozenset({DEFAULT_HEADER})
#: Shorter secrets are refused: HMAC-SHA256 is only as strong as its key.
MIN_SECRET_BYTES = 16

#: ``(key id, secret)``. The secret may be given as text (encoded as UTF-8).
SigningKey = tuple[str, bytes]

# Bumped if the MAC input ever changes, so an old signature can never verify
# under a new encoding.
_VERSION = b"exactlyonce-hmac-sha256-v1\n"
# Printable ASCII without space, ':' and ',': the separators of the environment
# variables' formats, and safe in a header and a log line.
_KEY_ID = re.compile(r"[!-+\--9;-~]{1,64}")
_HEX_DIGEST = re.compile(rb"[0-9a-f]{64}")


class Secret(bytes):
    """Bytes that do not show themselves: ``repr`` and ``str`` give ``<secret>``.

    A secret stored in a tuple, a dict or an object's attributes is then safe
    from ``repr``-based logging, error messages and tracebacks with locals.
    It is still ``bytes`` for :mod:`hmac` and for comparison.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "<secret>"


def check_signing_key(signing_key: Any) -> SigningKey:
    """Validate ``(key id, secret)``; return it with the secret as :class:`Secret` bytes.

    Raises :class:`~exactlyonce.ConfigurationError` (without the secret) when
    the key id is not 1 to 64 printable ASCII characters without space, ``:``
    or ``,``, or the secret is shorter than 16 bytes.
    """
    if not isinstance(signing_key, tuple) or len(signing_key) != 2:
        raise ConfigurationError("a signing key must be a (key id, secret) tuple")
    key_id, secret = signing_key
    return _check_key_id(key_id), _check_secret(secret, key_id)


def check_verification_keys(keys: Mapping[str, bytes | str]) -> dict[str, bytes]:
    """Validate a ``{key id: secret}`` mapping as :func:`check_signing_key` validates one key."""
    if not isinstance(keys, Mapping):
        raise ConfigurationError("verification keys must be a mapping {key id: secret}")
    if not keys:
        raise ConfigurationError("verification keys must hold at least one key")
    return {_check_key_id(key_id): _check_secret(secret, key_id) for key_id, secret in keys.items()}


def _check_key_id(key_id: object) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        # A key id is not secret, but a malformed one may be a secret pasted
        # in the wrong place: do not echo it.
        raise ConfigurationError(
            "a signing key id must be 1 to 64 printable ASCII characters without space, ':' or ','"
        )
    return key_id


def _check_secret(secret: object, key_id: str) -> Secret:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise ConfigurationError(f"the secret of signing key {key_id!r} must be bytes or text")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"the secret of signing key {key_id!r} must have at least {MIN_SECRET_BYTES} bytes"
        )
    return Secret(secret)


def _mac_input(message_id: str, key: bytes | None, value: bytes | None) -> bytes:
    parts = [_VERSION]
    for field in (message_id.encode("utf-8"), key, value):
        if field is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x01" + len(field).to_bytes(8, "big") + field)
    return b"".join(parts)


def _digest(secret: bytes, message_id: str, key: bytes | None, value: bytes | None) -> bytes:
    return hmac.new(secret, _mac_input(message_id, key, value), hashlib.sha256).digest()


def sign(message_id: str, key: bytes | None, value: bytes | None, signing_key: SigningKey) -> list[tuple[str, bytes]]:
    """The two headers that authenticate a record: ``[(KEY_ID_HEADER, id), (SIGNATURE_HEADER, hex MAC)]``.

    ``message_id`` is the ID the record carries in its ``message-id`` header;
    ``key`` and ``value`` are the record's raw bytes (``None`` for null).
    """
    key_id, secret = check_signing_key(signing_key)
    mac = _digest(secret, message_id, key, value).hex()
    return [(KEY_ID_HEADER, key_id.encode("ascii")), (SIGNATURE_HEADER, mac.encode("ascii"))]


def verify(message: Message, keys: Mapping[str, bytes]) -> None:
    """Check ``message``'s signature against ``keys`` (``{key id: secret}``); return if it is genuine.

    Raises :class:`~exactlyonce.errors.BadSignature` when the message has no
    (or more than one) signature, key-id or ``message-id`` header, names a
    key id not in ``keys``, carries a malformed signature, or its signature
    does not match its message ID, key and value. Several keys allow a
    rotation: sign with the new key once every consumer accepts both.
    The comparison takes constant time.
    """
    where = message.where()
    signature = _single_header(message, SIGNATURE_HEADER)
    key_id_raw = _single_header(message, KEY_ID_HEADER)
    message_id_raw = _single_header(message, DEFAULT_HEADER)
    if signature is None:
        raise BadSignature(f"{where}: unsigned: no {SIGNATURE_HEADER!r} header")
    if key_id_raw is None:
        raise BadSignature(f"{where}: no {KEY_ID_HEADER!r} header names the signing key")
    key_id = key_id_raw.decode("ascii", "replace")
    secret = keys.get(key_id)
    if secret is None:
        shown = key_id if _KEY_ID.fullmatch(key_id) else key_id[:64].encode("unicode_escape").decode("ascii")
        raise BadSignature(f"{where}: signed with unknown key id {shown!r} (known: {sorted(keys)})")
    if not _HEX_DIGEST.fullmatch(signature):
        raise BadSignature(f"{where}: malformed {SIGNATURE_HEADER!r} header: expected 64 lowercase hex digits")
    if message_id_raw is None:
        raise BadSignature(f"{where}: no {DEFAULT_HEADER!r} header, so there is no message ID to check")
    try:
        message_id = message_id_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSignature(f"{where}: the {DEFAULT_HEADER!r} header is not UTF-8") from None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    expected = _digest(secret, message_id, message.key, message.value)
    if not hmac.compare_digest(expected, bytes.fromhex(signature.decode("ascii"))):
        raise BadSignature(
            f"{where}: signature does not match message {message_id!r} (key id {key_id!r}): "
            "the ID, key or value was changed, or it was signed with another secret"
        )


def signed_parts(message: Message) -> Message:
    """``message`` reduced to what a valid signature vouches for: the ``message-id`` header, the key, the value.

    Every other header, and the timestamp, could have been changed by anyone
    who can write to the topic, so a message ID or a sequence number derived
    from them would let a forged copy of a genuine record claim another
    message's ID. The runner derives both from this view when it verifies
    signatures. The topic, partition and offset stay (the broker assigns
    them, and they name this copy only).
    """
    return dataclasses.replace(
        message, headers=tuple((name, value) for name, value in message.headers if name in SIGNED_HEADERS),
        timestamp_ms=None,
    )


def _single_header(message: Message, name: str) -> bytes | None:
    """The header's value; ``BadSignature`` if it is repeated (which copy would count is ambiguous)."""
    values = [value for header, value in message.headers if header == name]
    if len(values) > 1:
        raise BadSignature(f"{message.where()}: {len(values)} {name!r} headers; a signed record has one")
    return values[0] if values else None


def signing_key_from_env(environ: Mapping[str, str] = os.environ) -> SigningKey | None:
    """The key in ``EXACTLYONCE_SIGNING_KEY`` (``key-id:secret``), or ``None`` when unset or empty.

    The secret is everything after the first ``:``. Errors never include it.
    """
    text = environ.get(SIGNING_KEY_ENV, "").strip()
    if not text:
        return None
    return _parse_entry(text, SIGNING_KEY_ENV, "'key-id:secret'")


def resolve_signing_key(argument: SigningKey | None) -> SigningKey | None:
    """The key to sign with: ``argument`` (checked), else ``EXACTLYONCE_SIGNING_KEY``, else ``None``: unsigned."""
    return check_signing_key(argument) if argument is not None else signing_key_from_env()


def verification_keys_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, bytes] | None:
    """The keys in ``EXACTLYONCE_SIGNING_KEYS`` (``id1:secret1,id2:secret2``), or ``None`` when unset or empty.

    A secret in this variable cannot contain ``,``. Errors name the entry by
    position (and its key id once it parsed), never the secret.
    """
    text = environ.get(SIGNING_KEYS_ENV, "").strip()
    if not text:
        return None
    keys: dict[str, bytes] = {}
    for position, entry in enumerate(text.split(","), start=1):
        where = f"entry {position} of {SIGNING_KEYS_ENV}"
        key_id, secret = _parse_entry(entry.strip(), where, "'id1:secret1,id2:secret2'")
        if key_id in keys:
            raise ConfigurationError(f"{where}: key id {key_id!r} appears twice")
        keys[key_id] = secret
    return keys


def _parse_entry(entry: str, where: str, form: str) -> SigningKey:
    key_id, colon, secret = entry.partition(":")
    if not colon or not key_id:
        raise ConfigurationError(f"{where} must have the form {form}")
    try:
        return check_signing_key((key_id, secret))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
