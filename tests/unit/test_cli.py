"""CLI argument parsing and error output that need no service."""

from __future__ import annotations

import argparse
import json
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from exactlyonce import App, cli, logs
from exactlyonce.cli import main, parse_kafka_setting, parse_time
from exactlyonce.embedded import free_port
from exactlyonce.errors import ExactlyOnceError


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


# -- logging options after the subcommand -------------------------------------

#: Every leaf command with its required arguments.
LEAVES = [
    ["run", "m:app"],
    ["db", "upgrade"], ["db", "downgrade", "base"], ["db", "current"],
    ["prune", "--older-than", "15d"],
    ["relay"],
    ["outbox", "release", "1"], ["outbox", "discard", "1"],
    ["status"],
    ["inspect", "m-1"],
    ["dlq", "list", "t.dlq"], ["dlq", "replay", "t.dlq"],
    ["console"],
]


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return {prefix}
    return {leaf for name, sub in subparsers[0].choices.items() for leaf in _leaf_commands(sub, (*prefix, name))}


def test_leaves_lists_every_command() -> None:
    """A new command must be added to LEAVES, so that the tests below cover it."""
    leaves = _leaf_commands(cli._parser())
    assert len(leaves) == len(LEAVES)
    for leaf in leaves:
        assert any(argv[:len(leaf)] == list(leaf) for argv in LEAVES), leaf


@pytest.mark.parametrize("argv", LEAVES, ids=[" ".join(a[:2]) for a in LEAVES])
def test_logging_options_go_before_or_after_the_subcommand(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXACTLYONCE_LOG_LEVEL", raising=False)
    monkeypatch.delenv("EXACTLYONCE_LOG_FORMAT", raising=False)
    parse = cli._parser().parse_args
    args = parse(argv)
    assert (args.log_level, args.log_format) == ("INFO", "text")
    args = parse(["--log-level", "DEBUG", "--log-format", "json", *argv])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    args = parse([*argv, "--log-level", "DEBUG", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    # Given in both places: the one after the subcommand wins, each option on its own.
    args = parse(["--log-level", "ERROR", "--log-format", "json", *argv, "--log-level", "DEBUG"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    # And the other subcommand options still parse as before.
    assert parse([*argv, "--log-format", "json"]).command == argv[0]


def test_logging_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXACTLYONCE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("EXACTLYONCE_LOG_FORMAT", "json")
    args = cli._parser().parse_args(["status"])
    assert (args.log_level, args.log_format) == ("WARNING", "json")
    args = cli._parser().parse_args(["status", "--log-level", "DEBUG"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")


def test_a_command_logs_as_the_options_after_it_say(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`exactlyonce db current --log-level DEBUG --log-format json` logs at DEBUG, as JSON."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["--log-level", "ERROR", "--log-format", "text", "db", "current", "--database-url", url,
                 "--log-level", "DEBUG", "--log-format", "json"]) == 0
    out, err = capsys.readouterr()
    assert out == "base\n"
    lines = [json.loads(line) for line in err.splitlines()]
    # Registered secrets (the test databases' passwords, as short as "root") are masked in the path too.
    expected = {"level": "DEBUG", "logger": "exactlyonce.cli", "message": f"database: {logs.redact(url)}"}
    assert expected.items() <= lines[0].items()
    assert main(["db", "current", "--database-url", url, "--log-level", "ERROR"]) == 0
    assert capsys.readouterr() == ("base\n", "")


def test_db_takes_the_database_url_after_its_subcommand_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before, after = f"sqlite:///{tmp_path / 'before.db'}", f"sqlite:///{tmp_path / 'after.db'}"
    assert main(["db", "--database-url", before, "upgrade", "--database-url", after]) == 0
    head = capsys.readouterr().out.strip()
    assert head != "base"
    assert main(["db", "current", "--database-url", before]) == 0
    assert capsys.readouterr().out == "base\n"
    assert main(["db", "--database-url", after, "current"]) == 0
    assert capsys.readouterr().out == f"{head}\n"


def test_global_help_says_where_the_logging_options_go(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the one after the subcommand wins" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "wins over one given before the subcommand" in text


# -- run: connection settings over the App's ------------------------------------


def _run_args(*options: str) -> argparse.Namespace:
    return cli._parser().parse_args(["run", "m:app", *options])


def test_run_overrides_the_apps_connection_settings(tmp_path: Path) -> None:
    """--database-url, --bootstrap-servers and --kafka-config replace what the App was given in code."""
    app = App("g", bootstrap_servers="code:9092", database_url="sqlite:///code.db",
              consumer_config={"security_protocol": "PLAINTEXT", "max_poll_records": 7},
              producer_config={"security_protocol": "PLAINTEXT", "linger_ms": 5})
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cli._override_app_settings(app, _run_args(
        "--database-url", url, "--bootstrap-servers", "cli:9093",
        "--kafka-config", "security_protocol=SSL", "--kafka-config", "ssl_cafile=/ca.pem",
        "--kafka-config", "auto_offset_reset=latest", "--kafka-config", "acks=1"))
    assert app.database_url == url and app.engine.url.database == str(tmp_path / "cli.db")
    app.engine.dispose()
    assert app.bootstrap_servers == "cli:9093"
    # Each client gets the keys it knows, over the App's own; the App's others stay.
    assert app.consumer_config == {"security_protocol": "SSL", "ssl_cafile": "/ca.pem", "max_poll_records": 7,
                                   "auto_offset_reset": "latest"}
    assert app.producer_config == {"security_protocol": "SSL", "ssl_cafile": "/ca.pem", "linger_ms": 5, "acks": 1}


def test_run_refuses_a_database_url_an_apps_async_engine_would_ignore(tmp_path: Path) -> None:
    """--database-url cannot reach an async engine the App was given, or made already: refused, saying which."""
    import asyncio

    from exactlyonce import ExactlyOnceError, _db

    given = _db.create_async_engine(f"sqlite:///{tmp_path / 'given.db'}")
    with pytest.raises(ExactlyOnceError, match=r"was given its async engine \(async_engine=\)"):
        cli._override_app_settings(App("g", async_engine=given), _run_args("--database-url", "sqlite://"))
    made = App("g", database_url=f"sqlite:///{tmp_path / 'made.db'}")
    made.async_engine  # noqa: B018 - used at import time, say
    with pytest.raises(ExactlyOnceError, match=r"created its async engine when it was imported"):
        cli._override_app_settings(made, _run_args("--database-url", "sqlite://"))
    asyncio.run(given.dispose())
    asyncio.run(made.async_engine.dispose())


def test_run_without_connection_options_leaves_the_app_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXACTLYONCE_BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", "sqlite:///env.db")
    app = App("g", consumer_config={"max_poll_records": 7})
    cli._override_app_settings(app, _run_args())
    assert (app.bootstrap_servers, app.database_url) == ("env:9092", "sqlite:///env.db")
    assert (app.consumer_config, app.producer_config) == ({"max_poll_records": 7}, {})


def test_run_registers_the_database_password_as_a_secret() -> None:
    app = App("g")
    cli._override_app_settings(app, _run_args("--database-url", "postgresql://u:Run-Url-Secret-77@db/x"))
    assert "Run-Url-Secret-77" not in logs.redact(app.database_url)


@pytest.mark.parametrize(("setting", "problem"), [
    ("bootstrap_servers=x:1", "set it with --bootstrap-servers"),
    ("group_id=other", r"set it with App\(group_id=...\)"),
    ("max_poll_interval_ms=1000", "lock timeouts are derived from it"),
])
def test_run_refuses_settings_the_app_owns(setting: str, problem: str) -> None:
    with pytest.raises(ExactlyOnceError, match=problem):
        cli._override_app_settings(App("g"), _run_args("--kafka-config", setting))


def test_run_refuses_a_database_url_the_app_can_no_longer_take(tmp_path: Path) -> None:
    """The App created its engine at import: it would keep using it, so the option is refused."""
    app = App("g", database_url=f"sqlite:///{tmp_path / 'code.db'}")
    engine = app.engine
    with pytest.raises(ExactlyOnceError, match="created its database engine when it was imported"):
        cli._override_app_settings(app, _run_args("--database-url", f"sqlite:///{tmp_path / 'cli.db'}"))
    assert app.engine is engine
    engine.dispose()


def test_run_refuses_a_setting_neither_client_takes() -> None:
    args = _run_args()
    args.kafka_config = [("not_a_client_setting", 1)]  # the parser refuses it before; this is the second line
    with pytest.raises(ExactlyOnceError, match="not a setting of kafka-python's consumer or producer"):
        cli._override_app_settings(App("g"), args)


def test_unknown_kafka_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt --kafka-config key is an error, not silently dropped."""
    with pytest.raises(SystemExit) as caught:
        main(["status", "--kafka-config", "ssl_cafle=/ca.pem"])
    assert caught.value.code == 2
    assert "'ssl_cafle' is not a kafka-python client setting" in capsys.readouterr().err


def test_run_reports_a_refused_override_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType("exactlyonce_cli_test_app")
    module.app = App("g")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert main(["run", f"{module.__name__}:app", "--kafka-config", "group_id=x"]) == 2
    assert capsys.readouterr().err == ("exactlyonce: error: --kafka-config group_id cannot be overridden by `run`: "
                                       "set it with App(group_id=...)\n")


# -- relay --metrics-addr ---------------------------------------------------------


def test_relay_and_run_share_the_metrics_address_default() -> None:
    parse = cli._parser().parse_args
    assert parse(["relay"]).metrics_addr == parse(["run", "m:app"]).metrics_addr == cli.METRICS_ADDR == "0.0.0.0"
    assert parse(["relay", "--metrics-addr", "127.0.0.1"]).metrics_addr == "127.0.0.1"


def test_relay_serves_metrics_on_the_address_given(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The address reaches the server: one this host does not have cannot be bound (0.0.0.0 could)."""
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    port = free_port()
    code = main(["relay", "--once", "--database-url", url, "--bootstrap-servers", "127.0.0.1:1",
                 "--metrics-port", str(port), "--metrics-addr", "192.0.2.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"exactlyonce: error: cannot serve metrics on 192.0.2.1:{port}" in err
    # The same on an address it has: nothing pending, so --once is done at once.
    assert main(["relay", "--once", "--database-url", url, "--bootstrap-servers", "127.0.0.1:1",
                 "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]) == 0
    out, err = capsys.readouterr()
    assert out == "relayed 0 outbox messages\n"
    assert f"serving metrics at http://127.0.0.1:{port}/metrics" in err


# -- durations --------------------------------------------------------------------


def test_duration_options_take_compound_durations() -> None:
    args = cli._parser().parse_args(["prune", "--older-than", "1d12h", "--horizon", "15d1h"])
    assert (args.older_than, args.horizon) == (timedelta(days=1, hours=12), timedelta(days=15, hours=1))
    assert cli._parser().parse_args(["relay", "--retention", "36h"]).retention == timedelta(hours=36)


def test_a_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["prune", "--older-than", "7 days"])
    assert caught.value.code == 2
    assert "argument --older-than: invalid duration '7 days': use whole numbers with units" in capsys.readouterr().err


def test_parse_time_takes_compound_durations_ago() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert parse_time("1h30m", now=now) == now - timedelta(hours=1, minutes=30)
    assert parse_time("500ms", now=now) == now - timedelta(milliseconds=500)


def test_help_prints_default_durations_as_people_write_them(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("prune", "relay"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "days," not in text and "0:00:00" not in text
        assert {"prune": "default 15d)", "relay": "(default 7d)"}[command] in text


def test_relay_waits_for_a_restarting_database_at_its_start() -> None:
    """A transient database error at the start is retried (a supervisor restarted the relay mid-restart);
    any other error ends the command at once."""
    import sqlalchemy as sa

    calls: list[int] = []

    class Restarting(Exception):
        pass

    def check() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise sa.exc.OperationalError("SELECT 1", {}, Restarting("terminating connection"))

    cli._when_the_database_answers(check)
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise sa.exc.ProgrammingError("SELECT 1", {}, Restarting("no such table"))

    calls.clear()
    with pytest.raises(sa.exc.ProgrammingError):
        cli._when_the_database_answers(broken)
    assert len(calls) == 1
