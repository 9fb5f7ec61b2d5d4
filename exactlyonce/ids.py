"""Message-ID strategies: small callables ``Message -> str``.

The message ID is what makes a redelivered or re-sent record recognisable, so
it must be chosen by the *sender* and survive retransmission: a header the
producer stamps, a business key in the payload (``transfer_id``), or the record
key. Any callable ``Message -> str`` works; these are the ready ones. For a
handler registered with ``model=``, the strategy is given the message with its
typed payload (``message.payload``): :func:`field` reads it, and so can a
callable of your own (``lambda m: m.payload.transfer_id``).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from exactlyonce.errors import InvalidMessageId, MessageError
from exactlyonce.message import Message

MessageIdStrategy = Callable[[Message], str]

#: The header the default strategy reads (and :class:`exactlyonce.Producer` writes).
DEFAULT_HEADER = "message-id"

#: IDs longer than this do not fit the dedup table's column and are rejected,
#: never truncated (two IDs sharing a prefix must not collide).
MAX_MESSAGE_ID_LENGTH = 255

#: The first character of the IDs exactlyonce gives records it stores under
#: their coordinates (``@topic/partition/offset``). A message ID may not start
#: with it, so that no sender can forge (pre-claim) such an ID.
RESERVED_PREFIX = "@"

# Control characters (Unicode category Cc: C0, DEL, C1). NUL cannot be stored
# in PostgreSQL text at all; the others would let an ID rewrite log lines and
# terminal output, and no real identifier contains them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text_problem(text: str, limit: int) -> str | None:
    """Why ``text`` cannot be stored as an ID or stream key, or ``None`` if it can.

    Every database exactlyonce supports must store and compare it exactly:
    1 to ``limit`` characters (Unicode code points: a ``VARCHAR(limit)`` holds
    that many on PostgreSQL and in MySQL/MariaDB's utf8mb4, where a character
    takes up to 4 bytes, and compared byte for byte through a binary no-pad
    collation), encodable as strict UTF-8 (a lone surrogate, which
    ``json.loads`` makes from ``"\\ud800"``, is not: the drivers refuse it), and
    no control characters (PostgreSQL refuses NUL).
    """
    if not text:
        return "is empty"
    if len(text) > limit:
        return f"has {len(text)} characters, more than the {limit} the database column holds"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: U+{ord(text[exc.start]):04X} at position {exc.start} is a lone surrogate"
    control = _CONTROL.search(text)
    if control is not None:
        return f"contains the control character U+{ord(control.group()):04X} at position {control.start()}"
    return None

def outgoing_problem(message_id: object) -> str | None:
    """Why a sender may not give a record ``message_id``, or ``None`` if it may.

    The same rules :func:`resolve` applies when the record is consumed: an ID
    a consumer would dead-letter is refused when it is sent instead.
    """
    if not isinstance(message_id, str):
        return f"must be str, got {type(message_id).__name__}"
    problem = text_problem(message_id, MAX_MESSAGE_ID_LENGTH)
    if problem is not None:
        return problem
    if message_id.startswith(RESERVED_PREFIX):
        return (f"starts with {RESERVED_PREFIX!r}, which is reserved for the records exactlyonce "
                "stores under their coordinates")
    return None


_HEADER_ATTRIBUTE = "_exactlyonce_header"


def header(name: str = DEFAULT_HEADER) -> MessageIdStrategy:
    """Use the UTF-8 value of header ``name`` (the last one, if repeated)."""

    def from_header(message: Message) -> str:
        raw = message.header(name)
        if raw is None:
            raise InvalidMessageId(f"{message.where()}: no {name!r} header")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessageId(f"{message.where()}: header {name!r} is not UTF-8") from exc

    from_header.__qualname__ = f"header({name!r})"
    vars(from_header)[_HEADER_ATTRIBUTE] = name
    return from_header


def header_name(strategy: MessageIdStrategy) -> str | None:
    """The header a :func:`header` strategy reads; ``None`` for any other strategy."""
    name = getattr(strategy, _HEADER_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


def json_field(path: str) -> MessageIdStrategy:
    """Use a field of the JSON value; ``path`` may be dotted (``"meta.id"``).

    Strings are used as they are; integers are converted with ``str``. Any
    other type (float, object, list, bool, null) is rejected, because its text
    form is not a stable identity.
    """
    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"invalid JSON field path {path!r}")

    def from_json(message: Message) -> str:
        node = message.json()
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise InvalidMessageId(f"{message.where()}: JSON field {path!r} is missing")
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, str | int):
            raise InvalidMessageId(
                f"{message.where()}: JSON field {path!r} must be a string or integer, "
                f"got {type(node).__name__}"
            )
        return str(node)

    from_json.__qualname__ = f"json_field({path!r})"
    return from_json


_FIELD_ATTRIBUTE = "_exactlyonce_payload_field"


def field(path: str) -> MessageIdStrategy:
    """Use a field of the typed payload (``message.payload``); for handlers registered with ``model=``.

    ``path`` may be dotted (``"meta.id"``): each step reads an attribute (a
    nested model or dataclass) or a key (a dict). Strings are used as they
    are; integers become decimal text and UUIDs their canonical text; an
    enum member counts as its value. Any other type (float, bool, object,
    ``None``) is rejected, because its text form is not a stable identity.
    ``app.handler`` refuses this strategy without ``model=``, and a path
    whose first names are not fields of the model.
    """
    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"invalid payload field path {path!r}")
    missing = object()

    def from_payload(message: Message) -> str:
        node: Any = message.payload
        if node is None:
            raise InvalidMessageId(f"{message.where()}: no typed payload to read {path!r} from (the handler "
                                   "has no model=)")
        for part in parts:
            node = node.get(part, missing) if isinstance(node, Mapping) else getattr(node, part, missing)
            if node is missing:
                raise InvalidMessageId(f"{message.where()}: payload field {path!r} is missing")
        if isinstance(node, enum.Enum):
            node = node.value
        if isinstance(node, uuid.UUID):
            return str(node)
        if isinstance(node, str):
            return str.__str__(node)
        if isinstance(node, int) and not isinstance(node, bool):
            return str(int(node))
        raise InvalidMessageId(
            f"{message.where()}: payload field {path!r} must be a string, integer or UUID, got {type(node).__name__}"
        )

    from_payload.__qualname__ = f"field({path!r})"
    vars(from_payload)[_FIELD_ATTRIBUTE] = path
    return from_payload


def field_path(strategy: MessageIdStrategy) -> str | None:
    """The path a :func:`field` strategy reads; ``None`` for any other strategy."""
    path = getattr(strategy, _FIELD_ATTRIBUTE, None)
    return path if isinstance(path, str) else None


def key() -> MessageIdStrategy:
    """Use the record key, decoded as UTF-8."""

    def from_key(message: Message) -> str:
        if message.key is None:
            raise InvalidMessageId(f"{message.where()}: record has no key")
        try:
            return message.key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessageId(f"{message.where()}: record key is not UTF-8") from exc

    from_key.__qualname__ = "key()"
    return from_key


def resolve(strategy: MessageIdStrategy, message: Message) -> str:
    """Run ``strategy`` on ``message`` and check the result fits the dedup table.

    A usable ID is text of 1 to :data:`MAX_MESSAGE_ID_LENGTH` characters that
    every supported database stores exactly (see :func:`text_problem`) and
    that does not start with :data:`RESERVED_PREFIX`.

    Raises :class:`~exactlyonce.errors.InvalidMessageId` (or the strategy's own
    :class:`~exactlyonce.errors.MessageError`) for an unusable ID.
    """
    try:
        message_id = strategy(message)
    except MessageError:
        raise
    except Exception as exc:
        # A user's lambda such as ``m.json()["transfer_id"]`` raises KeyError on
        # a record without that field: that is bad input, not a crash.
        raise InvalidMessageId(
            f"{message.where()}: message ID strategy raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(message_id, str):
        raise InvalidMessageId(
            f"{message.where()}: message ID must be str, got {type(message_id).__name__}"
        )
    problem = text_problem(message_id, MAX_MESSAGE_ID_LENGTH)
    if problem is not None:
        raise InvalidMessageId(f"{message.where()}: message ID {problem}")
    if message_id.startswith(RESERVED_PREFIX):
        raise InvalidMessageId(
            f"{message.where()}: message ID starts with {RESERVED_PREFIX!r}, which is reserved for "
            "the records exactlyonce stores under their coordinates"
        )
    return message_id
