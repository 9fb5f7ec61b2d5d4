"""The ``exactlyonce`` command.

::

    exactlyonce run MODULE:ATTR         run an App until SIGTERM/SIGINT
    exactlyonce db upgrade [REVISION]   apply the framework's migrations
    exactlyonce db downgrade REVISION   revert them (``base`` drops the tables)
    exactlyonce db current              print the applied revision
    exactlyonce prune --older-than 14d  delete old dedup rows, in small batches
    exactlyonce relay [--once]          send the outbox's pending messages until SIGTERM/SIGINT

Connection settings come from ``EXACTLYONCE_BOOTSTRAP_SERVERS`` and
``EXACTLYONCE_DATABASE_URL`` unless given as options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa

from exactlyonce import _db, migrate, outbox, schema, store
from exactlyonce.app import DATABASE_URL_ENV, App
from exactlyonce.errors import ExactlyOnceError


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exactlyonce", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("EXACTLYONCE_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an App until SIGTERM/SIGINT")
    run.add_argument("app", metavar="MODULE:ATTR")

    db = commands.add_parser("db", help="manage the framework's tables")
    db.add_argument("--database-url", default=None,
                    help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_commands.add_parser("downgrade", help="revert migrations")
    downgrade.add_argument("revision")
    db_commands.add_parser("current", help="print the applied revision")

    prune = commands.add_parser("prune", help="delete dedup rows (or sent outbox rows) older than a "
                                "retention window")
    prune.add_argument("--database-url", default=None, help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")
    prune.add_argument("--older-than", required=True, type=parse_duration, metavar="DURATION",
                       help="e.g. 14d, 36h, 90m")
    prune.add_argument("--horizon", type=parse_duration, default=store.DEFAULT_REDELIVERY_HORIZON,
                       metavar="DURATION", help="the topics' Kafka log retention (default 7d)")
    prune.add_argument("--force", action="store_true", help="prune inside the redelivery horizon anyway")
    prune.add_argument("--batch-size", type=int, default=1000)
    prune.add_argument("--outbox", action="store_true",
                       help="prune the outbox's sent rows instead (never pending ones; no horizon applies)")

    relay = commands.add_parser("relay", help="send the outbox's pending messages until SIGTERM/SIGINT")
    relay.add_argument("--database-url", default=None, help=f"SQLAlchemy URL (default: ${DATABASE_URL_ENV})")
    relay.add_argument("--once", action="store_true", help="send what is pending now, then exit")
    relay.add_argument("--batch-size", type=int, default=100, help="rows per transaction (default 100)")
    relay.add_argument("--retention", type=parse_duration, default=outbox.DEFAULT_RETENTION,
                       metavar="DURATION", help="prune rows sent longer ago than this, hourly (default 7d)")
    return parser


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``90m``, ``36h``, ``14d`` or ``2w``."""
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use a number and one of s, m, h, d, w")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ExactlyOnceError(f"no database: pass --database-url or set {DATABASE_URL_ENV}")
    return str(url)


def _relay(args: argparse.Namespace) -> None:
    """Run a Relay until SIGTERM/SIGINT (or, with ``--once``, until nothing is left to send)."""
    engine = _db.create_engine(_database_url(args))
    if not sa.inspect(engine).has_table(schema.outbox.name):
        raise ExactlyOnceError(f"table {schema.outbox.name} is missing: run `exactlyonce db upgrade` first")
    relay = outbox.Relay(engine, batch_size=args.batch_size)
    try:
        if args.once:
            while relay.run_once():
                pass
        else:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: stop.set())
            logging.getLogger("exactlyonce").info("relaying the outbox")
            relay.run(stop, retention=args.retention)
    finally:
        relay.close()
    print(f"relayed {relay.published} outbox messages")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``exactlyonce`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            load_app(args.app).run()
        elif args.command == "prune" and args.outbox:
            deleted = outbox.prune(_db.create_engine(_database_url(args)), args.older_than,
                                   batch_size=args.batch_size)
            print(f"pruned {deleted} sent outbox rows older than {args.older_than}")
        elif args.command == "prune":
            deleted = store.prune(_db.create_engine(_database_url(args)), args.older_than,
                                  horizon=args.horizon, force=args.force, batch_size=args.batch_size)
            print(f"pruned {deleted} dedup rows older than {args.older_than}")
        elif args.command == "db":
            engine = _db.create_engine(_database_url(args))
            if args.db_command == "upgrade":
                migrate.upgrade(engine, args.revision)
            elif args.db_command == "downgrade":
                migrate.downgrade(engine, args.revision)
            print(migrate.current(engine) or "base")
        elif args.command == "relay":
            _relay(args)
    except ExactlyOnceError as exc:
        print(f"exactlyonce: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
