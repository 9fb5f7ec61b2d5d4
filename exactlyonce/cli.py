"""The ``exactlyonce`` command.

::

    exactlyonce run MODULE:ATTR [--metrics-port P]   run an App until SIGTERM/SIGINT
    exactlyonce db upgrade [REVISION]                apply the framework's migrations
    exactlyonce db downgrade REVISION                revert them (``base`` drops the tables)
    exactlyonce db current                           print the applied revision
    exactlyonce prune --older-than 15d               delete old dedup rows, in small batches
    exactlyonce relay [--once]                       send the outbox's pending messages until SIGTERM/SIGINT
    exactlyonce outbox release ID... | --all         send refused outbox rows again (after fixing the cause)
    exactlyonce outbox discard ID...                 delete refused outbox rows; the rows behind them go on
    exactlyonce status                               per scope: counts, open gaps, consumer lag
    exactlyonce inspect MESSAGE_ID                   what happened to one message
    exactlyonce dlq list TOPIC                       the records of a dead-letter topic
    exactlyonce dlq replay TOPIC                     send dead letters back to their original topic
    exactlyonce console [--host H] [--port P]        the web console (``exactlyonce[console]``)

Connection settings come from ``EXACTLYONCE_BOOTSTRAP_SERVERS`` and
``EXACTLYONCE_DATABASE_URL`` unless given as options (for ``run``, the
options override what the App was given in code). The commands that print a
report (``status``, ``inspect``, ``dlq``, ``prune``, ``outbox``) print JSON
instead with ``--json``; ``run``, ``relay`` and ``db`` print no report
(``relay`` and ``db`` end with one line: the count sent, the revision). An
error is one line on stderr and a non-zero exit status. Secrets (URL
passwords, SASL and signing secrets) are masked in everything printed and
logged. ``--log-level`` and ``--log-format`` go before or after the
subcommand; given in both places, the one after it wins. Durations are
written and printed as ``15d``, ``1h30m``, ``500ms``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.engine import make_url
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from exactlyonce import _duration, _kafka, admin, logs, outbox, settings
from exactlyonce.app import App
from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError
from exactlyonce.metrics import Metrics
from exactlyonce.settings import (
    BOOTSTRAP_SERVERS_ENV,
    CONSOLE_TOKEN_ENV,
    DATABASE_URL_ENV,
    KAFKA_CLIENT_ENV,
    LOG_FORMAT_ENV,
    LOG_LEVEL_ENV,
)
from exactlyonce.storage import engine as _db
from exactlyonce.storage import migrate, schema, store

log = logging.getLogger("exactlyonce.cli")

#: Exit status of ``inspect`` for an unknown message ID (errors exit 2).
EXIT_UNKNOWN = 1
EXIT_ERROR = 2


def load_app(spec: str) -> App:
    """Import ``MODULE:ATTR`` and return the :class:`App` it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExactlyOnceError(f"expected MODULE:ATTR, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExactlyOnceError(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ExactlyOnceError(f"{spec} is not an exactlyonce.App")
    return app


# -- argument types ---------------------------------------------------------

#: How a duration is printed: ``7d``, ``1h30m``, ``500ms`` (what :func:`parse_duration` reads back).
format_duration = _duration.format_duration


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``90m``, ``14d``, ``2w``, ``1h30m``, ``500ms``: the inverse of :func:`format_duration`."""
    try:
        return _duration.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from ISO-8601 (naive means UTC) or a duration ago (``2h``: two hours ago)."""
    try:
        return _duration.parse_time(text, now=now)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_kafka_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for kafka-python; integers and true/false are converted; an unknown KEY is refused."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {logs.redact(text)!r}")
    if admin.unknown_kafka_settings([key.strip()]):
        raise argparse.ArgumentTypeError(f"{key.strip()!r} is not a kafka-python client setting "
                                         "(names as in KafkaConsumer/KafkaProducer, e.g. security_protocol)")
    value: Any = raw
    if re.fullmatch(r"-?\d+", raw):
        value = int(raw)
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    if re.search(r"password|secret", key, re.IGNORECASE):
        logs.register_secret(raw)
    return key.strip(), value


def parse_position(text: str) -> tuple[int, int]:
    """``PARTITION@OFFSET`` of a dead letter."""
    try:
        return admin.parse_position(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- parser -----------------------------------------------------------------


def _database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")


def _kafka_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", default=None, metavar="SERVERS",
                        help=f"Kafka bootstrap servers, host:port[,...] (default: ${BOOTSTRAP_SERVERS_ENV})")
    parser.add_argument("--kafka-config", action="append", default=[], type=parse_kafka_setting,
                        metavar="KEY=VALUE", help="a kafka-python client setting (TLS, SASL); repeatable")


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


#: Default of ``--metrics-addr`` (``run`` and ``relay``).
METRICS_ADDR = "0.0.0.0"


def _metrics_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help=f"serve {what} at http://ADDR:PORT/metrics")
    parser.add_argument("--metrics-addr", default=METRICS_ADDR, metavar="ADDR",
                        help=f"the address --metrics-port listens on (default {METRICS_ADDR}: every interface)")


_LOG_LEVELS = "DEBUG, INFO, WARNING, ERROR"
_DESCRIPTION = "Run an exactlyonce App, and inspect, prune and repair what it keeps in the database and Kafka."
_GLOBAL_EPILOG = (
    "--log-level and --log-format also go after the subcommand (exactlyonce run X --log-level DEBUG); given in "
    f"both places, the one after the subcommand wins. The database and the broker come from ${DATABASE_URL_ENV} "
    f"and ${BOOTSTRAP_SERVERS_ENV} unless a command's --database-url and --bootstrap-servers say otherwise. "
    "An error is one line on stderr and exit status 2. `exactlyonce COMMAND --help` tells more."
)


def _global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """``--log-level`` and ``--log-format``: with defaults on the top-level parser, without after a subcommand.

    After a subcommand they default to ``SUPPRESS``: absent there, the value
    given before the subcommand (or its default) stays; given there, it wins,
    since argparse copies a subcommand's values over the top-level ones.
    """
    if after_command:
        level: Any = argparse.SUPPRESS
        fmt: Any = argparse.SUPPRESS
        where = "; wins over one given before the subcommand"
    else:
        level = os.environ.get(LOG_LEVEL_ENV, "INFO")
        fmt = os.environ.get(LOG_FORMAT_ENV, "text")
        where = ""
    group = parser.add_argument_group("logging options")
    group.add_argument("--log-level", default=level, metavar="LEVEL",
                       help=f"{_LOG_LEVELS} (default: ${LOG_LEVEL_ENV} or INFO{where})")
    group.add_argument("--log-format", choices=logs.FORMATS, default=fmt,
                       help=f"log lines as text or one JSON object each (default: ${LOG_FORMAT_ENV} or text{where})")


#: Adds a subcommand (with the logging options after it too) to a subparsers action.
_Add = Callable[[Any, str, str], argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exactlyonce", description=_DESCRIPTION, epilog=_GLOBAL_EPILOG)
    _global_options(parser, after_command=False)
    # Every subcommand (and sub-subcommand) takes the logging options too.
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, after_command=True)

    def add(subparsers: Any, name: str, text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(name, help=text, description=text, parents=[after])
        return sub

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_run_parser, _db_parser, _prune_parser, _relay_parser, _outbox_parser, _status_parser,
                        _inspect_parser, _dlq_parser, _console_parser):
        add_command(add, commands)
    return parser


def _run_parser(add: _Add, commands: Any) -> None:
    run = add(commands, "run", "run an App until SIGTERM/SIGINT")
    run.add_argument("app", metavar="MODULE:ATTR", help="the App to run: a module to import and its App "
                     "(myservice.worker:app)")
    _metrics_options(run, "Prometheus metrics")
    run.add_argument("--database-url", default=None, metavar="URL",
                     help=f"SQLAlchemy URL; overrides the App's database_url (default: the App's, else "
                     f"${DATABASE_URL_ENV})")
    run.add_argument("--bootstrap-servers", default=None, metavar="SERVERS",
                     help=f"Kafka bootstrap servers; overrides the App's bootstrap_servers (default: the App's, "
                     f"else ${BOOTSTRAP_SERVERS_ENV})")
    run.add_argument("--kafka-config", action="append", default=[], type=parse_kafka_setting,
                     metavar="KEY=VALUE", help="a kafka-python client setting (TLS, SASL) over the App's "
                     "consumer_config and producer_config (each client takes the keys it knows); repeatable; "
                     "not with the confluent client")
    run.add_argument("--kafka-client", default=None, choices=_kafka.KAFKA_CLIENTS,
                     help=f"the client the worker's consumer runs on; overrides the App's kafka_client "
                     f"(default: the App's, else ${KAFKA_CLIENT_ENV}, else kafka-python)")


def _db_parser(add: _Add, commands: Any) -> None:
    db = add(commands, "db", "manage the framework's tables")
    _database_option(db)
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = add(db_commands, "upgrade", "apply migrations")
    upgrade.add_argument("revision", nargs="?", default="head", help="(default head)")
    downgrade = add(db_commands, "downgrade", "revert migrations")
    downgrade.add_argument("revision", help="the revision to go back to; base drops the tables")
    current = add(db_commands, "current", "print the applied revision")
    for sub in (upgrade, downgrade, current):
        # Also after the subcommand (db upgrade --database-url URL); absent there, db's stays.
        sub.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                         help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")


def _prune_parser(add: _Add, commands: Any) -> None:
    prune = add(commands, "prune", "delete dedup rows (or sent outbox rows) older than a retention window")
    _database_option(prune)
    prune.add_argument("--older-than", required=True, type=parse_duration, metavar="DURATION",
                       help="the retention window: 14d, 36h, 90m, 1d12h (units w, d, h, m, s, ms, us)")
    _kafka_options(prune)
    prune.add_argument("--horizon", type=parse_duration, default=store.DEFAULT_REDELIVERY_HORIZON,
                       metavar="DURATION",
                       help="how long a record can be read again, for topics whose settings the broker does not "
                       f"give (unreachable, or no --bootstrap-servers; default "
                       f"{format_duration(store.DEFAULT_REDELIVERY_HORIZON)})")
    prune.add_argument("--force", action="store_true",
                       help="prune inside the redelivery horizon anyway (also compacted and infinite-retention topics)")
    prune.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (default 1000)")
    prune.add_argument("--outbox", action="store_true",
                       help="prune the outbox's sent rows instead (never pending ones; no horizon applies)")
    _json_option(prune)


def _relay_parser(add: _Add, commands: Any) -> None:
    relay = add(commands, "relay", "send the outbox's pending messages until SIGTERM/SIGINT")
    _database_option(relay)
    _kafka_options(relay)
    relay.add_argument("--once", action="store_true", help="send what is pending now, then exit")
    relay.add_argument("--batch-size", type=int, default=100, help="rows per transaction (default 100)")
    relay.add_argument("--retention", type=parse_duration, default=outbox.DEFAULT_RETENTION,
                       metavar="DURATION", help="prune rows sent longer ago than this, hourly "
                       f"(default {format_duration(outbox.DEFAULT_RETENTION)})")
    _metrics_options(relay, "the outbox gauges")


def _outbox_parser(add: _Add, commands: Any) -> None:
    box = add(commands, "outbox", "release or discard outbox rows the broker refused")
    box_commands = box.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")
    release = add(box_commands, "release", "make refused rows pending again: the relay sends them, "
                  "then the rows of their keys that waited (fix the cause first)")
    release.add_argument("ids", nargs="*", type=int, metavar="ID", help="outbox row ids (see `status`)")
    release.add_argument("--all", action="store_true", help="every refused row")
    discard = add(box_commands, "discard", "delete refused rows (their records are never sent); "
                  "the rows of their keys that waited go on")
    discard.add_argument("ids", nargs="+", type=int, metavar="ID", help="outbox row ids (see `status`)")
    for sub in (release, discard):
        _database_option(sub)
        _json_option(sub)


def _status_parser(add: _Add, commands: Any) -> None:
    status = add(commands, "status", "per handler scope: counts, open gaps, consumer lag; "
                 "the outbox's pending and refused rows")
    _database_option(status)
    _kafka_options(status)
    _json_option(status)


def _inspect_parser(add: _Add, commands: Any) -> None:
    inspect = add(commands, "inspect", "what happened to one message ID (exit 1 if unknown)")
    inspect.add_argument("message_id", metavar="MESSAGE_ID", help="the ID the handler's message_id strategy gives")
    inspect.add_argument("--scope", default=None, help="only this handler scope")
    inspect.add_argument("--app", default=None, metavar="MODULE:ATTR",
                         help="the App, to name each scope's configured dead-letter topic")
    _database_option(inspect)
    _json_option(inspect)


def _dlq_parser(add: _Add, commands: Any) -> None:
    dlq = add(commands, "dlq", "read and replay dead-letter topics")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    dlq_list = add(dlq_commands, "list", "the records of a dead-letter topic, oldest first")
    dlq_list.add_argument("topic", metavar="DLQ_TOPIC", help="a dead-letter topic (by default <topic>.dlq)")
    dlq_list.add_argument("--limit", type=int, default=None, metavar="N", help="show at most N records")
    dlq_list.add_argument("--last", type=int, default=None, metavar="N", help="only the newest N records")
    _dead_letter_filters(dlq_list)
    _kafka_options(dlq_list)
    _json_option(dlq_list)
    replay = add(dlq_commands, "replay", "send dead letters back to their original topic")
    replay.add_argument("topic", metavar="DLQ_TOPIC", help="a dead-letter topic (by default <topic>.dlq)")
    replay.add_argument("--id", action="append", default=[], dest="ids", metavar="MESSAGE_ID",
                        help="replay this message ID (repeatable)")
    replay.add_argument("--at", action="append", default=[], dest="positions", type=parse_position,
                        metavar="P@OFFSET", help="replay the dead letter at this place of DLQ_TOPIC, as `dlq list` "
                        "shows it (repeatable)")
    _dead_letter_filters(replay)
    replay.add_argument("--dry-run", action="store_true", help="print what would be replayed, send nothing")
    replay.add_argument("--yes", action="store_true", help="replay everything without asking (no filter given)")
    _database_option(replay)
    _kafka_options(replay)
    _json_option(replay)


def _console_parser(add: _Add, commands: Any) -> None:
    console = add(commands, "console", "serve the web console (needs exactlyonce[console])")
    console.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    console.add_argument("--port", type=int, default=8080, help="(default 8080; 0 picks a free port)")
    console.add_argument("--token", default=None,
                         help=f"allow replays for whoever gives this token (default ${CONSOLE_TOKEN_ENV}; "
                         "without one the console is read-only). Prefer the variable: other users can read a "
                         "command line")
    console.add_argument("--app", default=None, metavar="MODULE:ATTR",
                         help="the App, for its handlers' dead-letter topics and gap timeouts")
    console.add_argument("--dlq-topic", action="append", default=[], metavar="TOPIC",
                         help="another dead-letter topic to show (repeatable)")
    console.add_argument("--refresh", type=int, default=15, metavar="SECONDS",
                         help="how often the overview reloads itself (default 15)")
    console.add_argument("--sample-interval", type=float, default=30.0, metavar="SECONDS",
                         help="how often counts and lag are sampled for the rates and charts (default 30)")
    console.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                         help="a Host header to answer (repeatable; default: localhost and the loopback "
                         "addresses when listening on loopback, any otherwise)")
    _database_option(console)
    _kafka_options(console)


def _dead_letter_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", action="append", default=[], dest="reasons", metavar="REASON",
                        help="only dead letters with this reason (repeatable)")
    parser.add_argument("--since", type=parse_time, default=None, metavar="TIME",
                        help="dead-lettered at or after TIME (ISO-8601, or a duration ago: 2h)")
    parser.add_argument("--until", type=parse_time, default=None, metavar="TIME",
                        help="dead-lettered before TIME")


# -- settings ---------------------------------------------------------------


def _database_url(args: argparse.Namespace) -> str:
    url = settings.database_url(args.database_url, option="--database-url")
    # A password typed on the command line is not in the environment configure() scanned.
    with contextlib.suppress(sa.exc.ArgumentError):
        logs.register_secret(make_url(url).password)
    log.debug("database: %s", url)  # the log filter masks its password
    return str(url)


def _bootstrap_servers(args: argparse.Namespace) -> str | None:
    return settings.argument_or_environment(args.bootstrap_servers, BOOTSTRAP_SERVERS_ENV)


def _reader(args: argparse.Namespace, *, required: bool) -> admin.KafkaReader | None:
    servers = (settings.bootstrap_servers(args.bootstrap_servers, option="--bootstrap-servers") if required
               else _bootstrap_servers(args))
    if servers is None:
        return None
    return admin.KafkaReader(servers, dict(args.kafka_config))


# -- output -----------------------------------------------------------------


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _print(*renderables: Any) -> None:
    """Print rich renderables to stdout, secrets redacted.

    Rendered into a buffer first so that :func:`logs.redact` sees the final
    text, whatever a table cell or a value held.
    """
    terminal = _is_terminal()
    buffer = io.StringIO()
    width = shutil.get_terminal_size().columns if terminal else int(os.environ.get("COLUMNS", "200"))
    console = Console(file=buffer, force_terminal=terminal, width=width, highlight=False, markup=False,
                      emoji=False, soft_wrap=True)
    for renderable in renderables:
        console.print(renderable)
    sys.stdout.write(logs.redact(buffer.getvalue()))
    sys.stdout.flush()


def _print_json(data: Any) -> None:
    sys.stdout.write(logs.redact(json.dumps(data, indent=2, ensure_ascii=False, default=str)) + "\n")
    sys.stdout.flush()


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; elsewhere (pipes, CI logs) a no-op, so output stays parseable."""
    if not _is_terminal():
        yield lambda n: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(file=sys.stdout), transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- commands ---------------------------------------------------------------


def _override_app_settings(app: App, args: argparse.Namespace) -> None:
    """``run``'s connection options over what the App was given in code (or reads from the environment).

    They reach everything ``App.run()`` starts: the consumer, the dead-letter
    producer and the outbox relay read ``bootstrap_servers``,
    ``consumer_config`` and ``producer_config`` only when they start, and the
    engine is created on first use. Refused: an override the App could no
    longer honour (an engine it has already created) and settings the App
    owns (the group, the servers, and ``max_poll_interval_ms``, which its lock
    timeouts were derived from when it was created).
    """
    # The App has no public setters for these (its constructor takes them); set what
    # its properties read, as the constructor would have.
    if args.database_url is not None:
        if app._engine_given:
            raise ExactlyOnceError(f"--database-url cannot take effect: {args.app} was given its database engine "
                                   "(App(engine=...)), which it uses as it is")
        if app._engine is not None:
            raise ExactlyOnceError(f"--database-url cannot take effect: {args.app} created its database engine "
                                   "when it was imported (app.engine was used), and would keep using it")
        if app._async_engine is not None:
            raise ExactlyOnceError(
                f"--database-url cannot take effect: {args.app} " + (
                    "created its async engine when it was imported (app.async_engine was used)"
                    if app.owns_async_engine else "was given its async engine (async_engine=)"
                ) + ", and would keep using it")
        app._database_url = _database_url(args)
    if args.bootstrap_servers is not None:
        app._bootstrap_servers = args.bootstrap_servers
    if args.kafka_client is not None:
        app.kafka_client = _kafka.check_kafka_client(args.kafka_client)
    config = dict(args.kafka_config)
    if config and app.kafka_client == "confluent":
        raise ExactlyOnceError("--kafka-config takes kafka-python settings, and this App's consumer runs on the "
                               "confluent client: set its librdkafka properties in App(consumer_config=...) and "
                               "the kafka-python producer's in App(producer_config=...)")
    owned = {"bootstrap_servers": "--bootstrap-servers", "group_id": "App(group_id=...)",
             "max_poll_interval_ms": "the App's consumer_config (its lock timeouts are derived from it)"}
    for key, where in owned.items():
        if key in config:
            raise ExactlyOnceError(f"--kafka-config {key} cannot be overridden by `run`: set it with {where}")
    consumer, producer = admin.consumer_settings(config), admin.producer_settings(config)
    neither = sorted(set(config) - set(consumer) - set(producer))
    if neither:
        raise ExactlyOnceError(f"--kafka-config {', '.join(neither)}: not a setting of kafka-python's consumer or "
                               "producer, the clients `run` starts")
    app.consumer_config.update(consumer)
    app.producer_config.update(producer)
    if config:
        log.debug("kafka settings from --kafka-config: consumer %s, producer %s", consumer, producer)


def _run(args: argparse.Namespace) -> None:
    app = load_app(args.app)
    _override_app_settings(app, args)
    if args.metrics_port is not None:
        # Before run(): a taken port is a ConfigurationError, reported before anything is consumed.
        app.metrics.serve(args.metrics_port, args.metrics_addr)
        log.info("serving metrics at http://%s:%d/metrics", args.metrics_addr, app.metrics.port or 0)
    app.run()


#: How long a long-running command waits at its start for a database that is restarting.
STARTUP_PATIENCE = timedelta(seconds=60)


def _when_the_database_answers(check: Callable[[], object]) -> None:
    """Run ``check``, retrying a transient database error (a restart, a lost connection) for a minute.

    A relay started (or restarted by its supervisor) while the database
    restarts should wait for it, as the relay's own loop does later, rather
    than exit at its first query.
    """
    Retrying(
        retry=retry_if_exception(_db.is_transient),
        stop=stop_after_delay(STARTUP_PATIENCE.total_seconds()),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        before_sleep=lambda state: log.warning("the database does not answer yet (%s); retrying",
                                               state.outcome and state.outcome.exception()),
        reraise=True,
    )(check)


def _relay(args: argparse.Namespace) -> None:
    """Run a Relay until SIGTERM/SIGINT (or, with ``--once``, until nothing is left to send)."""
    engine = _db.create_engine(_database_url(args))

    def check_tables() -> None:
        migrate.require_tables(engine, schema.outbox)
        outbox.require_columns(engine)

    _when_the_database_answers(check_tables)
    metrics = Metrics() if args.metrics_port is not None else None
    servers = settings.bootstrap_servers(args.bootstrap_servers, option="--bootstrap-servers")
    relay = outbox.Relay(engine, servers, batch_size=args.batch_size,
                         producer_config=admin.producer_settings(dict(args.kafka_config)), metrics=metrics)
    try:
        if metrics is not None:
            metrics.serve(args.metrics_port, args.metrics_addr)
            log.info("serving metrics at http://%s:%d/metrics", args.metrics_addr, metrics.port or 0)
        if args.once:
            while relay.run_once():
                pass
        else:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: stop.set())
            log.info("relaying the outbox")
            relay.run(stop, retention=args.retention)
    finally:
        relay.close()
        if metrics is not None:
            metrics.close()
    print(f"relayed {relay.published} outbox messages")


@contextmanager
def _quiet_kafka() -> Iterator[None]:
    """kafka-python logs every failed connection attempt; the caller reports the failure itself, in one line."""
    logger = logging.getLogger("kafka")
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _redelivery_horizons(
    args: argparse.Namespace, topics: list[str]
) -> tuple[dict[str, store.TopicHorizon], str | None]:
    """Each topic's horizon from the broker, or ``--horizon`` for all with why the broker's were not read."""
    if not topics:
        return {}, None
    servers = _bootstrap_servers(args)
    if servers is None:
        why = f"no Kafka broker given (--bootstrap-servers or ${BOOTSTRAP_SERVERS_ENV})"
    else:
        reader = admin.KafkaReader(servers, dict(args.kafka_config))
        try:
            with _quiet_kafka():
                return admin.redelivery_horizons(reader, topics, fallback=args.horizon), None
        except TransientError as exc:
            why = str(exc)
        finally:
            reader.close()
    problem = f"the broker's settings could not be read: {why}"
    return {topic: store.fallback_horizon(topic, args.horizon, problem) for topic in topics}, problem


def _outbox(args: argparse.Namespace) -> None:
    """Release or discard refused outbox rows."""
    if args.outbox_command == "release" and bool(args.ids) == bool(args.all):
        raise ExactlyOnceError("name the refused rows to release (IDs, see `exactlyonce status`) or pass --all")
    engine = _db.create_engine(_database_url(args))
    try:
        migrate.require_tables(engine, schema.outbox)
        outbox.require_columns(engine)
        if args.outbox_command == "release":
            count = outbox.release(engine, None if args.all else args.ids)
        else:
            count = outbox.discard(engine, args.ids)
        left = outbox.refused(engine)
    finally:
        engine.dispose()
    verb = "released" if args.outbox_command == "release" else "discarded"
    if args.json:
        _print_json({verb: count, "refused": [r.to_json() for r in left]})
        return
    what = "pending again: the relay sends them, then the rows that waited behind them" if verb == "released" \
        else "deleted: the rows that waited behind them go on"
    print(f"{verb} {count} refused outbox row(s) ({what}); {len(left)} refused row(s) left")


def _prune(args: argparse.Namespace) -> None:
    """Prune in batches; a progress bar (total counted up front) on a terminal.

    Dedup rows: each topic among the rows to delete is checked against its
    redelivery horizon, read from the broker (``--horizon`` when it cannot be).
    """
    engine = _db.create_engine(_database_url(args))
    table = schema.outbox if args.outbox else schema.processed
    horizons: dict[str, store.TopicHorizon] = {}
    broker_problem = None
    if not args.outbox:
        horizons, broker_problem = _redelivery_horizons(args, store.topics_to_prune(engine, args.older_than))
    cutoff = settings.utcnow() - args.older_than
    total = None
    if _is_terminal():
        column = schema.outbox.c.sent_at if args.outbox else schema.processed.c.processed_at
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(table).where(column < cutoff)).scalar_one()
    with _progress(f"pruning {table.name}", total) as advance:
        if args.outbox:
            deleted = outbox.prune(engine, args.older_than, batch_size=args.batch_size, progress=advance)
        else:
            deleted = store.prune(engine, args.older_than, horizon=args.horizon, horizons=horizons,
                                  force=args.force, batch_size=args.batch_size, progress=advance)
    what = "sent outbox rows" if args.outbox else "dedup rows"
    result: dict[str, Any] = {"table": table.name, "deleted": deleted,
                              "older_than_seconds": args.older_than.total_seconds(),
                              "cutoff": cutoff.replace(tzinfo=UTC).isoformat()}
    if not args.outbox:
        result.update(forced=args.force, horizon_rule=store.HORIZON_RULE,
                      broker_settings_read=bool(horizons) and broker_problem is None, broker_problem=broker_problem,
                      fallback_horizon_seconds=args.horizon.total_seconds(),
                      topics=[horizons[topic].to_json() for topic in sorted(horizons)])
    if args.json:
        _print_json(result)
        return
    lines = []
    if broker_problem is not None:
        lines.append(f"{broker_problem}; every topic got the --horizon fallback of "
                     f"{format_duration(args.horizon)}")
    for topic in sorted(horizons):
        h = horizons[topic]
        how = "--horizon fallback" if broker_problem is not None else f"{h.source}: {h.reason}"
        lines.append(f"topic {topic}: redelivery horizon {h.text} ({how})"
                     + (" -- pruned inside it (--force)" if args.force and not h.allows(args.older_than) else ""))
    lines.append(f"pruned {deleted} {what} older than {format_duration(args.older_than)}")
    for line in lines:
        print(logs.redact(line))


def _status(args: argparse.Namespace) -> None:
    url = _database_url(args)
    engine = _db.create_engine(url)
    reader = _reader(args, required=False)
    try:
        result = admin.status(engine, reader)
    finally:
        if reader is not None:
            reader.close()
        engine.dispose()
    servers = reader.bootstrap_servers if reader else None
    if args.json:
        _print_json(admin.status_document(result, database_url=url, bootstrap_servers=servers))
        return
    header = f"database {url}, broker {servers or '(none)'}"
    if not result.scopes:
        _print(header, "no handler scope has processed anything yet (table exactlyonce_counters is empty)",
               *_outbox_renderables(result.outbox))
        return
    summary = Table(title="handler scopes", title_justify="left")
    for name in ("scope", "group", "applied", "dups", "skipped", "dead", "parked", "gaps", "last processed", "lag"):
        summary.add_column(name, justify="right" if name not in ("scope", "group", "last processed") else "left",
                           no_wrap=name == "last processed")
    for scope in result.scopes:
        summary.add_row(scope.scope, scope.group_id, _num(scope.total("applied")), _num(scope.total("duplicates")),
                        _num(scope.total("skipped")), _num(scope.total("dead_lettered")),
                        _num(scope.total("parked")), _num(scope.open_gaps), _when(scope.last_processed_at),
                        _num(scope.lag))
    partitions = Table(title="partitions", title_justify="left")
    for name in ("scope", "topic", "partition", "applied", "last offset", "committed", "end", "lag"):
        partitions.add_column(name, justify="left" if name in ("scope", "topic") else "right")
    for scope in result.scopes:
        for p in scope.partitions:
            partitions.add_row(scope.scope, p.topic, str(p.partition), _num(p.applied), _num(p.last_offset),
                               _num(p.committed), _num(p.end_offset), _num(p.lag))
    renderables: list[Any] = [header, summary, partitions]
    for scope in result.scopes:
        if scope.oldest_gap_since is not None:
            renderables.append(f"{scope.scope}: {scope.open_gaps} sequenced stream(s) waiting for a missing "
                               f"number, the longest since {_when(scope.oldest_gap_since)}")
    if result.lag_error:
        renderables.append(f"consumer lag unknown: {result.lag_error}")
    _print(*renderables, *_outbox_renderables(result.outbox))


def _outbox_renderables(status: admin.OutboxStatus | None) -> list[Any]:
    if status is None:
        return ["outbox: unknown (no outbox table at the current revision; run `exactlyonce db upgrade`)"]
    line = f"outbox: {_num(status.pending)} pending, {_num(status.refused_count)} refused by the broker"
    if status.oldest_pending_at is not None:
        line += f"; the oldest pending row was stored at {_when(status.oldest_pending_at)}"
    if not status.refused:
        return [line]
    table = Table(title="refused outbox rows (each holds back the later rows of its topic and key)",
                  title_justify="left")
    for name in ("id", "topic", "key", "message id", "refused", "waiting", "reason"):
        table.add_column(name, justify="right" if name in ("id", "waiting") else "left",
                         overflow="fold", no_wrap=name == "refused")
    for r in status.refused:
        key = "(none)" if r.key is None else r.key.decode("utf-8", "replace")
        table.add_row(str(r.id), r.topic, key, r.message_id, _when(r.refused_at), _num(r.waiting), r.reason)
    hint = ("fix the cause (the topic's max.message.bytes, its ACLs), then `exactlyonce outbox release ID` "
            "(or `--all`); `exactlyonce outbox discard ID` drops a row for good")
    return [line, table, hint]


def _inspect(args: argparse.Namespace) -> int:
    topics = {}
    if args.app:
        topics = {h.scope: h.dead_letter_topic for h in load_app(args.app).handlers.values()}
    engine = _db.create_engine(_database_url(args))
    try:
        findings = admin.inspect(engine, args.message_id, scope=args.scope, dead_letter_topics=topics)
    finally:
        engine.dispose()
    if args.json:
        _print_json({"message_id": args.message_id, "known": bool(findings),
                     "findings": [f.to_json() for f in findings]})
    elif not findings:
        where = f" in scope {args.scope!r}" if args.scope else ""
        _print(f"message {args.message_id!r} is unknown{where}: never processed, not parked "
               "(or its dedup row was pruned)")
    else:
        lines = []
        for f in findings:
            if f.state == "parked":
                lines.append(f"{f.scope}: parked since {_when(f.at)} as number {f.number} of stream {f.stream!r}, "
                             f"waiting for the numbers before it; from {f.topic}[{f.partition}]@{f.offset}")
                continue
            lines.append(f"{f.scope}: {f.state.replace('_', '-')} at {_when(f.at)}, "
                         f"from {f.topic}[{f.partition}]@{f.offset}, payload sha256 {f.fingerprint}")
            if f.state == schema.Outcome.DEAD_LETTERED:
                source = "configured" if f.scope in topics else "the default; pass --app to read the configured one"
                lines.append(f"  dead-lettered to {f.dead_letter_topic} ({source}); see `exactlyonce dlq list "
                             f"{f.dead_letter_topic}`")
        _print(*lines)
    return 0 if findings else EXIT_UNKNOWN


def _dlq_list(args: argparse.Namespace) -> None:
    reader = _reader(args, required=True)
    assert reader is not None
    try:
        records = admin.read_dead_letters(reader, args.topic, limit=args.limit, newest=args.last)
    finally:
        reader.close()
    records = admin.select_dead_letters(records, reasons=args.reasons, since=args.since, until=args.until)
    if args.json:
        _print_json([r.to_json() for r in records])
        return
    table = Table(title=f"{args.topic}: {len(records)} dead letter(s)", title_justify="left")
    for name in ("dlq p@offset", "dead-lettered", "original", "message id", "reason", "error"):
        table.add_column(name, overflow="fold", no_wrap=name == "dead-lettered")
    for r in records:
        data = r.to_json()
        original = f"{r.topic}[{data['partition']}]@{data['offset']}" if r.topic else "(unknown)"
        error = f"{r.meta.get('error-type', '')}: {r.meta.get('error-message', '')}".strip(": ")
        table.add_row(f"{r.dlq_partition}@{r.dlq_offset}", _when(r.timestamp), original, r.message_id or "-",
                      r.meta.get("reason", "-"), error or "-")
    _print(table)


def _dlq_replay(args: argparse.Namespace) -> None:
    reader = _reader(args, required=True)
    assert reader is not None
    try:
        records = admin.read_dead_letters(reader, args.topic)
    finally:
        reader.close()
    selected = admin.select_dead_letters(records, ids=args.ids, since=args.since, until=args.until,
                                         reasons=args.reasons, positions=args.positions)
    filtered = bool(args.ids or args.since or args.until or args.reasons or args.positions)
    if not filtered and not args.dry_run and not args.yes and selected:
        _confirm(f"replay all {len(selected)} dead letter(s) of {args.topic} to their original topics?")
    if args.dry_run:
        items = admin.replay(selected, engine=None, send=None, dry_run=True)
    else:
        items = _replay_for_real(args, selected)
    if args.json:
        _print_json({"dlq_topic": args.topic, "selected": len(selected), "items": [i.to_json() for i in items]})
        return
    lines = []
    for item in items:
        where = f"{args.topic}[{item.record.dlq_partition}]@{item.record.dlq_offset}"
        if item.action == "skipped":
            lines.append(f"skipped {where}: {item.reason}")
        else:
            verb = "would replay" if item.action == "would-replay" else "replayed"
            lines.append(f"{verb} {where} -> {item.record.topic} (message id {item.record.message_id})")
    counts = {action: sum(i.action == action for i in items) for action in ("replayed", "would-replay", "skipped")}
    lines.append(f"{counts['replayed']} replayed, {counts['would-replay']} would be replayed, "
                 f"{counts['skipped']} skipped, of {len(records)} record(s) in {args.topic}")
    _print(*lines)


def _replay_for_real(args: argparse.Namespace, selected: list[admin.DeadLetterRecord]) -> list[admin.ReplayItem]:
    if not selected:
        return []
    engine = _db.create_engine(_database_url(args))
    servers = _bootstrap_servers(args)
    assert servers is not None  # _reader(required=True) checked
    try:
        with _progress("replaying", len(selected)) as advance:
            return admin.replay_to_topics(selected, engine=engine, bootstrap_servers=servers,
                                          kafka_config=dict(args.kafka_config), progress=lambda: advance(1))
    finally:
        engine.dispose()


def _confirm(question: str) -> None:
    """Ask on the terminal; refuse outright when nobody can answer (a pipe, cron, CI)."""
    if not sys.stdin.isatty():
        raise ExactlyOnceError(f"refusing to {question.rstrip('?')} without confirmation: stdin is not a "
                               "terminal; pass --yes, or select records with --id/--since/--until")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise ExactlyOnceError("replay cancelled")


def _console(args: argparse.Namespace) -> None:
    """Serve the web console until SIGTERM/SIGINT."""
    try:
        from exactlyonce import console
    except ImportError as exc:
        raise ConfigurationError(f"the console needs its extra: pip install 'exactlyonce[console]' ({exc})") from exc
    token = args.token if args.token is not None else os.environ.get(CONSOLE_TOKEN_ENV) or None
    if token is not None:
        logs.register_secret(token)
    topics: dict[str, str] = {}
    gap_timeouts: dict[str, timedelta] = {}
    if args.app:
        handlers = load_app(args.app).handlers.values()
        topics = {h.scope: h.dead_letter_topic for h in handlers}
        gap_timeouts = {h.scope: h.gap_timeout for h in handlers if h.sequence is not None}
    settings = console.Settings(
        database_url=_database_url(args), bootstrap_servers=_bootstrap_servers(args),
        kafka_config=dict(args.kafka_config), token=token, dead_letter_topics=topics,
        extra_dead_letter_topics=list(args.dlq_topic), gap_timeouts=gap_timeouts, refresh_seconds=args.refresh,
        sample_interval=args.sample_interval, allowed_hosts=list(args.allowed_host) or None,
    )
    console.serve(settings, host=args.host, port=args.port)


def _db_command(args: argparse.Namespace) -> None:
    engine = _db.create_engine(_database_url(args))
    if args.db_command == "upgrade":
        migrate.upgrade(engine, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(engine, args.revision)
    print(migrate.current(engine) or "base")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        _run(args)
    elif args.command == "prune":
        _prune(args)
    elif args.command == "db":
        _db_command(args)
    elif args.command == "relay":
        _relay(args)
    elif args.command == "outbox":
        _outbox(args)
    elif args.command == "status":
        _status(args)
    elif args.command == "inspect":
        return _inspect(args)
    elif args.command == "console":
        _console(args)
    elif args.command == "dlq" and args.dlq_command == "list":
        _dlq_list(args)
    elif args.command == "dlq":
        _dlq_replay(args)
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's text (SQLAlchemy appends SQL and a help link), redacted."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return logs.redact(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``exactlyonce`` console script.

    Exit status: 0 on success, 1 for ``inspect`` of an unknown ID, 2 for an
    error (one line on stderr, the traceback only at ``--log-level DEBUG``),
    130 when interrupted.
    """
    args = _parser().parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"exactlyonce: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.command != "run" and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kafka-python narrates every connection at INFO: noise around a one-shot command's output.
        logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("exactlyonce: interrupted", file=sys.stderr)
        return 130
    except (ExactlyOnceError, ConfigurationError) as exc:
        log.debug("failed", exc_info=True)
        print(f"exactlyonce: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except sa.exc.SQLAlchemyError as exc:
        log.debug("failed", exc_info=True)
        print(f"exactlyonce: error: database: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        log.debug("failed", exc_info=True)
        print(f"exactlyonce: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
