"""logs.py: JSON lines with the known extras, and secrets redacted from every log line."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from exactlyonce import logs
from exactlyonce.logs import RepeatFilter

DB_SECRET = "Db-Pa55word-31x"
SASL_SECRET = "Sasl-Pa55word-77q"
SIGNING_SECRET = "signing-secret-0123456789abcdef"
SECRETS = (DB_SECRET, SASL_SECRET, SIGNING_SECRET)


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    """Start from no registered literals: earlier tests in the process registered their own
    (the test databases' passwords, such as ``postgres``), which would mask words here."""
    with logs._literals_lock:
        saved = set(logs._literals)
        logs._literals.clear()
    yield
    with logs._literals_lock:
        logs._literals.clear()
        logs._literals.update(saved)


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    # The test services' URLs (EXACTLYONCE_TEST_POSTGRES_URL, ...) carry
    # passwords such as "postgres" that configure() would register, masking words here.
    for name in [name for name in os.environ if name.startswith("EXACTLYONCE_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EXACTLYONCE_SIGNING_KEY", f"k1:{SIGNING_SECRET}")
    buffer = io.StringIO()
    yield buffer
    logs.reset()


def _log_everything(logger: logging.Logger) -> None:
    logger.info("connecting to %s", f"postgresql://app:{DB_SECRET}@db.internal:5432/app")
    logger.info("kafka settings %s", {"security_protocol": "SASL_SSL", "sasl_plain_password": SASL_SECRET})
    logger.warning("retrying with sasl_plain_password=%s ssl_password='%s'", SASL_SECRET, SASL_SECRET)
    # The signing secret, quoted where no pattern recognises it: the environment registered it.
    logger.error("key rejected: %s", SIGNING_SECRET)
    try:
        raise RuntimeError(f"cannot connect to mysql://root:{DB_SECRET}@db/app")
    except RuntimeError:
        logger.exception("failed")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_reaches_the_log(stream: io.StringIO, fmt: str) -> None:
    """URL passwords, SASL passwords (dict and key=value) and the signing secret are masked, tracebacks too."""
    logs.configure("INFO", fmt, stream=stream)
    _log_everything(logging.getLogger("some.library"))
    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output
    assert "postgresql://app:***@db.internal:5432/app" in output
    assert "'sasl_plain_password': '***'" in output or '\'sasl_plain_password\': \'***\'' in output
    assert "mysql://root:***@db/app" in output  # from the traceback
    assert "RuntimeError" in output


def test_json_lines_carry_the_known_extras(stream: io.StringIO) -> None:
    """One object per line: time, level, logger, message and the listed extras; other attributes stay out."""
    logs.configure("DEBUG", "json", stream=stream)
    log = logging.getLogger("exactlyonce")
    log.info("applied %s", "m-1", extra={"scope": "g:t", "message_id": "m-1", "topic": "t", "partition": 2,
                                          "offset": 41, "outcome": "applied", "unrelated": "x"})
    log.debug("plain")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "applied m-1" and first["level"] == "INFO" and first["logger"] == "exactlyonce"
    assert {k: first[k] for k in ("scope", "message_id", "topic", "partition", "offset", "outcome")} == {
        "scope": "g:t", "message_id": "m-1", "topic": "t", "partition": 2, "offset": 41, "outcome": "applied"}
    assert "unrelated" not in first
    assert first["time"].endswith("+00:00")
    assert set(second) == {"time", "level", "logger", "message"}


def test_configure_twice_keeps_one_handler(stream: io.StringIO) -> None:
    """A second configure() replaces the first handler instead of doubling every line."""
    logs.configure("INFO", "text", stream=io.StringIO())
    logs.configure("INFO", "text", stream=stream)
    logging.getLogger("x").info("once")
    assert stream.getvalue().count("once") == 1


def test_configure_rejects_unknown_format_and_level() -> None:
    with pytest.raises(ValueError, match="log format"):
        logs.configure("INFO", "xml")
    with pytest.raises(ValueError, match="log level"):
        logs.configure("LOUD")


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql+psycopg://u:p%40ss@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
    ("mysql://root@h/db", "mysql://root@h/db"),
    ("{'password': 'x', 'user': 'u'}", "{'password': '***', 'user': 'u'}"),
    ('{"ssl_password": "x y"}', '{"ssl_password": "***"}'),
    ("EXACTLYONCE_SIGNING_KEY=k1:abc,def", "EXACTLYONCE_SIGNING_KEY=***,def"),
    ("Relay(signing_key=('k1', b'raw'))", "Relay(signing_key=(***))"),
    ("password authentication failed for user", "password authentication failed for user"),
])
def test_redact(text: str, expected: str) -> None:
    assert logs.redact(text) == expected


def test_repeated_kafka_client_lines_are_held_back_and_counted() -> None:
    """A storm of one kafka-python line passes `limit` times a window; the next window's first counts the rest."""
    now = [0.0]
    repeat = RepeatFilter(limit=2, window_s=60, clock=lambda: now[0])

    def record(name: str, msg: str = "Marking the coordinator dead (node %s) for group %s: %s.") -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (1, "g", "down"), None)

    storm = [record("kafka.coordinator.base") for _ in range(50)]
    assert [repeat.filter(r) for r in storm] == [True, True] + [False] * 48
    # Other templates, other kafka loggers and other libraries are not held back by this one.
    assert repeat.filter(record("kafka.coordinator.base", "Heartbeat failed"))
    assert repeat.filter(record("kafka.conn"))
    assert all(repeat.filter(record("exactlyonce")) for _ in range(10))
    now[0] = 61.0
    later = record("kafka.coordinator.base")
    assert repeat.filter(later)
    assert "(48 more like it held back in the last 61 s)" in later.getMessage()
    assert later.getMessage().startswith("Marking the coordinator dead (node 1) for group g: down.")
