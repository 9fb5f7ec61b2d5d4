"""Logging set-up for the ``exactlyonce`` command: text or JSON lines, secrets redacted.

Operators paste log lines into tickets and ship them to log stores, so a
secret that reaches a log line has leaked. Three kinds travel through this
library's messages: database URLs (``postgresql://app:secret@db/app``), Kafka
client settings (``sasl_plain_password``, ``ssl_password``) and the outbox
signing key. :func:`configure` installs :class:`RedactingFilter` on the
handler, so every record is cleaned after its arguments are merged and its
traceback formatted, whichever logger (ours, SQLAlchemy's, kafka-python's)
produced it. :func:`redact` is the same cleaning for text the CLI prints.

Redaction is pattern-based (URL passwords, ``key=value`` and ``'key': value``
pairs whose key names a secret) plus literal: the values of secret-looking
environment variables and any value passed to :func:`register_secret` are
replaced wherever they appear, even in a message that does not name them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy.engine import make_url

__all__ = [
    "EXTRA_FIELDS", "MASK", "JsonFormatter", "RedactingFilter", "RepeatFilter", "configure", "redact",
    "register_secret", "reset",
]

#: What a secret is replaced with.
MASK = "***"

#: Attributes copied into a JSON log line when a record carries them
#: (``log.info(..., extra={"scope": ..., "message_id": ...})``).
EXTRA_FIELDS = ("scope", "message_id", "topic", "partition", "offset", "outcome", "reason", "stream", "number")

# A key that names a secret: password, passwd, secret, sasl_plain_password,
# ssl_password, signing key (signing_key, signing-key, EXACTLYONCE_SIGNING_KEYS).
_SECRET_KEY = r"[\w.-]*(?:password|passwd|secret|signing[_-]?keys?)[\w.-]*"

# scheme://user:password@host -> scheme://user:***@host. The password is
# everything up to the last '@' before whitespace or a quote.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"]*:)(?P<secret>[^\s'\"]+)(?=@)")

# 'sasl_plain_password': 'x', "password": "x", password='x', secret=x, SIGNING_KEY: x
_KEY_VALUE = re.compile(
    rf"(?P<head>(?P<q>['\"]?){_SECRET_KEY}(?P=q)\s*[:=]\s*)"
    r"(?P<value>\([^)]*\)|b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|<[^>\s]*>|[^\s,;})\]&]+)",
    re.IGNORECASE,
)

# Environment variables whose values are secrets, registered by configure().
_SECRET_ENV = re.compile(r".*(PASSWORD|PASSWD|SECRET|SIGNING_KEYS?|TOKEN).*", re.IGNORECASE)
# Literal secrets shorter than this are not replaced: "abc" would mask words.
_MIN_LITERAL = 4

_literals: set[str] = set()
_literals_lock = threading.Lock()


def register_secret(value: str | bytes | None) -> None:
    """Replace ``value`` with ``***`` wherever it appears in later log lines and CLI output.

    For secrets the patterns cannot recognise by context (a signing secret
    quoted in a stray error message, say). Values under four characters are
    ignored, as masking them would mangle ordinary words.
    """
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if len(text) >= _MIN_LITERAL:
        with _literals_lock:
            _literals.add(text)


def register_environment_secrets(environ: dict[str, str] | None = None) -> None:
    """Register the secrets the process's environment holds.

    The password of any URL-valued variable (``EXACTLYONCE_DATABASE_URL``),
    the value of any variable named like a secret (``PGPASSWORD``,
    ``..._SASL_PLAIN_PASSWORD``), and the secret halves of
    ``EXACTLYONCE_SIGNING_KEY`` / ``EXACTLYONCE_SIGNING_KEYS`` (``id:secret,...``).
    """
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not value:
            continue
        if "://" in value:
            # Not a URL SQLAlchemy understands: the URL pattern still applies.
            with contextlib.suppress(Exception):
                register_secret(make_url(value).password)
        if _SECRET_ENV.fullmatch(name):
            register_secret(value)
            for part in value.split(","):
                _, sep, secret = part.partition(":")
                if sep:
                    register_secret(secret)


def redact(text: str) -> str:
    """``text`` with every recognisable secret replaced by ``***``."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = _KEY_VALUE.sub(_mask_value, text)
    with _literals_lock:
        literals = sorted(_literals, key=len, reverse=True)
    for literal in literals:
        if literal in text:
            text = text.replace(literal, MASK)
    return text


def _mask_value(match: re.Match[str]) -> str:
    value = match["value"]
    if value.startswith("("):
        return f"{match['head']}({MASK})"
    if value.startswith(("'", '"', "b'", 'b"')):
        quote = value[-1]
        return f"{match['head']}{quote}{MASK}{quote}"
    return match["head"] + MASK


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message and traceback with :func:`redact`.

    The message is merged with its arguments first (``record.getMessage()``),
    because a secret usually arrives as an argument (``log.info("%s", url)``),
    and the arguments are then dropped so no later formatter sees them raw.
    Installed on a handler, it sees the records of every logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what we have
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            # The formatter would otherwise format exc_info again, unredacted.
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO-8601), level, logger, message, the known extras.

    Log stores index fields; a message's ``scope`` or ``message_id`` is then
    searchable without parsing the text. Only the fields in
    :data:`EXTRA_FIELDS` are copied, so an unrelated attribute someone set on
    a record never leaks into the output.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if name in record.__dict__:
                entry[name] = _jsonable(record.__dict__[name])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return redact(str(value))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class RepeatFilter(logging.Filter):
    """Let through at most ``limit`` records of one message template of one kafka client logger per ``window_s``.

    While a coordinator or broker is down, kafka-python (and librdkafka) log
    the same line for every retry, thousands a minute per worker, burying
    exactlyonce's own lines. The first ``limit`` of a window pass; the next
    one to pass after the window says how many like it were held back.
    Records of other loggers always pass.
    """

    PREFIXES = ("kafka", "librdkafka")

    def __init__(self, limit: int = 5, window_s: float = 60.0, clock: Any = None) -> None:
        super().__init__()
        self._limit = limit
        self._window_s = window_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        #: (logger, template) -> [window start, passed in the window, held back].
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.PREFIXES):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen.clear()
            state = self._seen.setdefault(key, [now, 0, 0])
            if now - state[0] >= self._window_s:
                held, since = int(state[2]), now - state[0]
                state[:] = [now, 0, 0]
                if held:
                    record.msg = f"{record.msg} ({held} more like it held back in the last {since:.0f} s)"
            if state[1] >= self._limit:
                state[2] += 1
                return False
            state[1] += 1
            return True

# The handler configure() installed, replaced on a second call.
_installed: logging.Handler | None = None


def configure(level: str, fmt: str = "text", *, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records to ``stream`` (default stderr) as ``fmt`` lines, secrets redacted.

    ``level`` is a level name (``INFO``, ``debug``); ``fmt`` is ``"text"`` or
    ``"json"``. Secrets found in the environment are registered first (see
    :func:`register_environment_secrets`). Calling it again replaces the
    handler it installed before, so tests and repeated CLI invocations in
    one process do not double every line. Returns the handler.
    """
    global _installed
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    register_environment_secrets()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RepeatFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(numeric)
    _installed = handler
    return handler


def reset() -> None:
    """Remove the handler :func:`configure` installed (tests whose captured stream is about to close)."""
    global _installed
    if _installed is not None:
        logging.getLogger().removeHandler(_installed)
        _installed = None
