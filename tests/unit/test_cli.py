"""CLI argument parsing and error output that need no service."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from exactlyonce import logs
from exactlyonce.cli import main, parse_kafka_setting, parse_time


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield
    logs.reset()


def test_parse_time() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now=now) == now - timedelta(hours=2)
    assert parse_time("2026-11-29T10:00:00") == datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    assert parse_time("2026-11-29T10:00:00+02:00") == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="ISO-8601"):
        parse_time("yesterday")


def test_parse_kafka_setting_converts_and_registers_secrets() -> None:
    assert parse_kafka_setting("request_timeout_ms=3000") == ("request_timeout_ms", 3000)
    assert parse_kafka_setting("ssl_check_hostname=false") == ("ssl_check_hostname", False)
    assert parse_kafka_setting("sasl_plain_password=Cli-Secret-991") == ("sasl_plain_password", "Cli-Secret-991")
    assert logs.redact("echo Cli-Secret-991") == "echo ***"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_kafka_setting("novalue")


def test_error_is_one_redacted_line(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    """A failing command prints one line on stderr, exit 2, no traceback, no password."""
    code = main(["status", "--database-url", "postgresql://u:Cli-Db-Secret-5@127.0.0.1:1/x",
                 "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("exactlyonce: error: database: OperationalError") and err.count("\n") == 1
    assert "Cli-Db-Secret-5" not in err and "Traceback" not in err


def test_missing_database_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXACTLYONCE_DATABASE_URL", raising=False)
    assert main(["inspect", "m-1"]) == 2
    assert "no database: pass --database-url or set EXACTLYONCE_DATABASE_URL" in capsys.readouterr().err
