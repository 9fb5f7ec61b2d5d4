"""Engine construction and error classification: the SQLAlchemy seam."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session

from exactlyonce.errors import ConfigurationError, TransientError

if TYPE_CHECKING:
    # Imported when an async engine is made: sqlalchemy.ext.asyncio needs greenlet (the async extras).
    from sqlalchemy.ext.asyncio import AsyncEngine

# A URL without a driver gets the driver exactlyonce tests against, instead of
# SQLAlchemy's historical default (psycopg2 / mysqlclient), which is usually
# not installed.
_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql",
                    "mariadb": "mariadb+pymysql"}
# The same rule for async engines (async handlers): psycopg 3's async mode,
# asyncmy, aiosqlite. A URL naming a tested sync driver gets its async twin.
_DEFAULT_ASYNC_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+asyncmy", "mysql+pymysql": "mysql+asyncmy",
    "mariadb": "mariadb+asyncmy", "mariadb+pymysql": "mariadb+asyncmy",
    "sqlite": "sqlite+aiosqlite", "sqlite+pysqlite": "sqlite+aiosqlite",
}

#: kafka-python's default ``max_poll_interval_ms``: a member that does not
#: poll for this long is evicted from its group.
DEFAULT_MAX_POLL_INTERVAL = timedelta(milliseconds=300_000)

#: How long a framework statement waits for a row lock (PostgreSQL
#: ``lock_timeout``, MariaDB/MySQL ``innodb_lock_wait_timeout``, SQLite's busy
#: timeout) before it fails as transient: a tenth of the poll interval, so
#: that a worker blocked by another's locks retries, rewinds and polls again
#: instead of being evicted.
DEFAULT_LOCK_TIMEOUT = DEFAULT_MAX_POLL_INTERVAL / 10

#: How long a statement in a transaction of several records waits for a row
#: lock on PostgreSQL before the records are redone in smaller transactions
#: (see :func:`bound_lock_wait`): well below ``deadlock_timeout``'s 1 s.
DEFAULT_BATCH_LOCK_TIMEOUT = timedelta(milliseconds=200)

#: How long a session may sit idle inside a transaction before the server ends
#: it and releases its locks (PostgreSQL ``idle_in_transaction_session_timeout``,
#: MariaDB ``idle_transaction_timeout``): the poll interval, past which the
#: worker holding the transaction has been evicted from its group anyway.
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = DEFAULT_MAX_POLL_INTERVAL

#: How long a SQLite writer waits for another process's write lock (by default).
SQLITE_BUSY_TIMEOUT_S = DEFAULT_LOCK_TIMEOUT.total_seconds()


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and fill in the default driver for its dialect."""
    parsed = _parse(url)
    driver = _DEFAULT_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def normalize_async_url(url: str | URL) -> URL:
    """Parse ``url`` for an async engine: the tested async driver for a URL without one.

    A URL naming one of the tested sync drivers (``pymysql``, ``pysqlite``)
    gets its async twin, so that one ``database_url`` serves an App's sync and
    async handlers alike; psycopg 3 is both (SQLAlchemy picks its async mode
    for an async engine). Any other driver is kept: it must be an async one.
    """
    parsed = _parse(url)
    driver = _DEFAULT_ASYNC_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc


def create_engine(
    url: str | URL,
    *,
    lock_timeout: timedelta = DEFAULT_LOCK_TIMEOUT,
    idle_in_transaction_timeout: timedelta = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    **kwargs: Any,
) -> Engine:
    """Create an engine tuned for claim-then-handle transactions.

    - every dialect: ``pool_pre_ping`` so a restarted database is reconnected
      to instead of failing the next transaction;
    - PostgreSQL: each connection's ``lock_timeout`` and
      ``idle_in_transaction_session_timeout``; MariaDB/MySQL:
      ``innodb_lock_wait_timeout`` and, on MariaDB, ``idle_transaction_timeout``
      (whole seconds, rounded up). A lock wait then fails as a transient error
      instead of waiting for a paused worker's locks without limit, and a
      paused worker's transaction is ended by the server;
    - SQLite: WAL, ``lock_timeout`` as the busy timeout, and ``BEGIN
      IMMEDIATE`` so that a transaction takes the write lock up front. Two
      processes claiming the same ID then queue on the lock instead of failing
      with "database is locked" when one tries to upgrade a read lock.
    """
    parsed = normalize_url(url)
    _check_timeouts(lock_timeout, idle_in_transaction_timeout)
    _defaults(parsed, lock_timeout, kwargs)
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise ConfigurationError(f"cannot use database URL {parsed!r}: {exc}") from exc
    tune(engine, lock_timeout=lock_timeout, idle_in_transaction_timeout=idle_in_transaction_timeout)
    return engine


def create_async_engine(
    url: str | URL,
    *,
    lock_timeout: timedelta = DEFAULT_LOCK_TIMEOUT,
    idle_in_transaction_timeout: timedelta = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    **kwargs: Any,
) -> AsyncEngine:
    """:func:`create_engine` for async handlers: the same settings, on an async driver.

    The driver comes from :func:`normalize_async_url` (psycopg 3 in async
    mode, asyncmy, aiosqlite); the per-connection settings are those of
    :func:`create_engine`, applied through the engine's ``sync_engine``.
    """
    parsed = normalize_async_url(url)
    _check_timeouts(lock_timeout, idle_in_transaction_timeout)
    _defaults(parsed, lock_timeout, kwargs)
    try:
        from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

        engine = _create_async_engine(parsed, **kwargs)
    except (ImportError, sa.exc.ArgumentError, sa.exc.InvalidRequestError) as exc:
        raise ConfigurationError(
            f"cannot use database URL {parsed!r} for async handlers: {exc} (install the async driver: "
            "exactlyonce[postgres-async], [mysql-async] or [sqlite-async])"
        ) from exc
    tune(engine.sync_engine, lock_timeout=lock_timeout, idle_in_transaction_timeout=idle_in_transaction_timeout)
    return engine


def _check_timeouts(lock_timeout: timedelta, idle_in_transaction_timeout: timedelta) -> None:
    for name, value in (("lock_timeout", lock_timeout), ("idle_in_transaction_timeout", idle_in_transaction_timeout)):
        if not isinstance(value, timedelta) or value <= timedelta(0):
            raise ConfigurationError(f"{name} must be a positive timedelta")


def _defaults(parsed: URL, lock_timeout: timedelta, kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("pool_pre_ping", True)
    if parsed.get_backend_name() == "sqlite":
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("timeout", lock_timeout.total_seconds())
        # The driver's own implicit BEGIN is switched off; we emit ours below.
        connect_args.setdefault("isolation_level", None)


def tune(
    engine: Engine,
    *,
    lock_timeout: timedelta = DEFAULT_LOCK_TIMEOUT,
    idle_in_transaction_timeout: timedelta = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
) -> None:
    """Add :func:`create_engine`'s per-connection settings to ``engine`` (an async engine's ``sync_engine`` too)."""
    backend = engine.url.get_backend_name()
    if backend == "sqlite":
        _tune_sqlite(engine, in_memory=engine.url.database in (None, "", ":memory:"))
    else:
        _set_timeouts(engine, backend, lock_timeout, idle_in_transaction_timeout)


def _set_timeouts(engine: Engine, backend: str, lock_timeout: timedelta, idle_timeout: timedelta) -> None:
    """Set the session's lock wait and idle-in-transaction timeouts on every new connection."""
    if backend == "postgresql":
        statements = [
            f"SET lock_timeout = {math.ceil(lock_timeout / timedelta(milliseconds=1))}",
            f"SET idle_in_transaction_session_timeout = {math.ceil(idle_timeout / timedelta(milliseconds=1))}",
        ]
    elif backend in ("mysql", "mariadb"):
        statements = [f"SET SESSION innodb_lock_wait_timeout = {math.ceil(lock_timeout.total_seconds())}"]
    else:
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
            if backend != "postgresql":
                cursor.execute("SELECT VERSION()")
                if "mariadb" in str(cursor.fetchone()[0]).lower():
                    # MySQL has no such setting.
                    cursor.execute(
                        f"SET SESSION idle_transaction_timeout = {math.ceil(idle_timeout.total_seconds())}"
                    )
        finally:
            cursor.close()
        # Keep the settings: commit the transaction the driver may have opened.
        dbapi_connection.commit()


def _tune_sqlite(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Through a cursor: sqlite3's connection and aiosqlite's adapted one both have it.
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    event.listen(engine, "begin", _begin_immediate)


def _begin_immediate(connection: sa.Connection) -> None:
    """Take SQLite's write lock when the transaction begins (see :func:`create_engine`)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# -- an engine the application made (App(engine=...)) -----------------------------

#: Where a MySQL/MariaDB connection keeps its own session values while the framework's are in force.
_SAVED_SESSION = "exactlyonce.saved_session_timeouts"


def adopt_engine(
    engine: Any,
    *,
    lock_timeout: timedelta,
    idle_in_transaction_timeout: timedelta,
    lock_timeout_given: bool,
) -> Engine:
    """The framework's view of an engine the application configured itself; the engine is left as it is.

    The view is ``engine.execution_options()``: it shares the engine's pool,
    its connection settings and every event listener registered on it (now
    or later), and adds listeners of its own that only the framework's
    transactions fire:

    - PostgreSQL: each transaction starts by setting ``lock_timeout`` and
      ``idle_in_transaction_session_timeout`` for itself only (``SET LOCAL``,
      as ``set_config(..., true)``): they end with it;
    - MariaDB/MySQL: each transaction starts by saving the session's
      ``innodb_lock_wait_timeout`` (and MariaDB's ``idle_transaction_timeout``)
      and setting the framework's; they are set back just before it commits
      or rolls back (MySQL has no transaction-scoped setting);
    - SQLite: the engine must come from :func:`create_engine` (``BEGIN
      IMMEDIATE``, WAL, the busy timeout as its ``lock_timeout``), since
      those are settings of its connections that a view cannot add; the lock
      wait is the engine's, so ``lock_timeout_given`` is refused;
    - other databases get nothing, as :func:`create_engine` gives them nothing.

    Refused (:class:`ConfigurationError`): not a synchronous ``Engine``, an
    engine in ``AUTOCOMMIT`` (the claim and the handler's writes would not
    share a transaction), and a SQLite engine as above. The framework never
    disposes of it: the application that made it owns it.
    """
    if not isinstance(engine, Engine):
        raise ConfigurationError(
            f"engine must be a sqlalchemy.Engine (sqlalchemy.create_engine(...)), not {type(engine).__name__}"
        )
    options = engine.get_execution_options()
    if options.get("isolation_level", getattr(engine.dialect, "_on_connect_isolation_level", None)) == "AUTOCOMMIT":
        raise ConfigurationError(
            "engine is in AUTOCOMMIT: every statement would commit on its own, so a record's claim and its "
            "handler's writes would not share one transaction; give an engine with transactions"
        )
    backend = engine.dialect.name
    if backend == "sqlite":
        if not _has_listener(engine, "begin", _begin_immediate):
            raise ConfigurationError(
                "a SQLite engine must be made by exactlyonce.storage.engine.create_engine(url, **kwargs) (it "
                "takes SQLAlchemy's create_engine arguments): the framework needs BEGIN IMMEDIATE, WAL and a "
                "busy timeout on its connections, which it cannot add to an engine made elsewhere"
            )
        if lock_timeout_given:
            raise ConfigurationError(
                "lock_timeout has no effect on a SQLite engine given as engine=: its busy timeout is the "
                "lock_timeout it was made with (create_engine(url, lock_timeout=...))"
            )
    view = engine.execution_options()
    if backend == "postgresql":
        _set_local_timeouts(view, lock_timeout, idle_in_transaction_timeout)
    elif backend in ("mysql", "mariadb"):
        _swap_session_timeouts(view, lock_timeout, idle_in_transaction_timeout)
    return view


def _has_listener(engine: Engine, name: str, listener: Any) -> bool:
    """Whether ``listener`` is registered for ``name`` on ``engine`` or on the engine it is a view of."""
    current: Any = engine
    while current is not None:
        if event.contains(current, name, listener):
            return True
        current = getattr(current, "_proxied", None)  # an OptionEngine's engine
    return False


def _set_local_timeouts(view: Engine, lock_timeout: timedelta, idle_timeout: timedelta) -> None:
    # set_config(..., is_local => true) is SET LOCAL: the value ends with the transaction.
    statement = (
        f"SELECT set_config('lock_timeout', '{math.ceil(lock_timeout / timedelta(milliseconds=1))}', true), "
        "set_config('idle_in_transaction_session_timeout', "
        f"'{math.ceil(idle_timeout / timedelta(milliseconds=1))}', true)"
    )

    @event.listens_for(view, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql(statement)


def _swap_session_timeouts(view: Engine, lock_timeout: timedelta, idle_timeout: timedelta) -> None:
    lock_seconds = math.ceil(lock_timeout.total_seconds())
    idle_seconds = math.ceil(idle_timeout.total_seconds())

    @event.listens_for(view, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        mariadb = bool(getattr(connection.dialect, "is_mariadb", False))
        names = ["innodb_lock_wait_timeout", *(["idle_transaction_timeout"] if mariadb else [])]
        ours = {"innodb_lock_wait_timeout": lock_seconds, "idle_transaction_timeout": idle_seconds}
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("SELECT " + ", ".join(f"@@SESSION.{name}" for name in names))
            row = cursor.fetchone()
            assert row is not None  # a SELECT of variables returns one row
            saved = dict(zip(names, row, strict=True))
            cursor.execute("SET " + ", ".join(f"SESSION {name} = {ours[name]}" for name in names))
        finally:
            cursor.close()
        connection.info[_SAVED_SESSION] = saved

    def _restore(connection: sa.Connection) -> None:
        saved = connection.info.pop(_SAVED_SESSION, None)
        if not saved:
            return
        with contextlib.suppress(Exception):  # a lost connection is discarded with what it had set
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute("SET " + ", ".join(f"SESSION {name} = {int(value)}" for name, value in saved.items()))
            finally:
                cursor.close()

    event.listen(view, "commit", _restore)
    event.listen(view, "rollback", _restore)


# SQLite reports both a busy database and a missing table as OperationalError;
# only the first is worth retrying.
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "disk i/o error")

# The MySQL drivers whose errors carry the server's error code first in their
# args: PyMySQL (sync) and asyncmy (async), and the other usual ones.
_MYSQL_DRIVER_MODULES = ("pymysql", "asyncmy", "MySQLdb", "mariadb", "mysql")

# PyMySQL (and asyncmy) raise OperationalError for most server errors, an unknown column
# (1054) included; only these codes are worth retrying: too many connections,
# server shutdown, lock wait timeout, deadlock, connection killed, idle
# timeout, and the client's lost-connection errors; and 1020 ("Record has
# changed since last read"), MariaDB's write conflict under REPEATABLE READ
# with innodb_snapshot_isolation (the default from MariaDB 11.6).
_MYSQL_TRANSIENT = {1020, 1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, each once."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__context__, current.__cause__]


def is_transient(exc: BaseException, *, chained: bool = False) -> bool:
    """Whether ``exc`` is a database failure that may pass if retried.

    Lost connections, deadlocks, serialization failures, lock timeouts and a
    busy SQLite file are transient; constraint violations, SQL errors and a
    missing table are not. With ``chained``, an exception raised from or while
    handling a transient one (a handler that wrapped a deadlock) is transient
    too.
    """
    if chained:
        return any(is_transient(each) for each in _chain(exc))
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError):
        module = type(exc.orig).__module__
        if module.startswith("sqlite3"):
            return any(text in str(exc.orig).lower() for text in _SQLITE_TRANSIENT)
        if module.startswith(_MYSQL_DRIVER_MODULES):
            args: tuple[Any, ...] = getattr(exc.orig, "args", ())
            return bool(args) and args[0] in _MYSQL_TRANSIENT
        return True
    return isinstance(exc, sa.exc.InterfaceError | sa.exc.TimeoutError)


# Deadlocks and serialization failures: the transaction lost a race for rows
# that another one holds, and the same transaction retried at once is likely
# to lose it again. PostgreSQL SQLSTATEs and MySQL/MariaDB error codes.
_PG_CONFLICTS = {"40001", "40P01"}
_MYSQL_CONFLICTS = {1020, 1213}
#: Those, and a lock wait timeout.
_PG_LOCK_LOSSES = _PG_CONFLICTS | {"55P03"}


def is_conflict(exc: BaseException, *, lock_waits: bool = False) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a deadlock or serialization failure.

    With ``lock_waits``, PostgreSQL's lock wait timeout (``lock_not_available``)
    counts too: for a transaction whose lock waits :func:`bound_lock_wait`
    cut short to find deadlocks early. (Elsewhere a lock wait timeout comes
    after the full ``lock_timeout``: a transient failure, not a lost race.)
    """
    pg = _PG_LOCK_LOSSES if lock_waits else _PG_CONFLICTS
    for each in _chain(exc):
        orig = each.orig if isinstance(each, sa.exc.DBAPIError) else each
        if getattr(orig, "sqlstate", None) in pg or getattr(orig, "pgcode", None) in pg:
            return True
        if type(orig).__module__.startswith(_MYSQL_DRIVER_MODULES):
            args: tuple[Any, ...] = getattr(orig, "args", ())
            if args and args[0] in _MYSQL_CONFLICTS:
                return True
    return False


def bound_lock_wait(session: Session, wait: timedelta) -> None:
    """Make the statements of ``session``'s transaction wait at most ``wait`` for a lock (PostgreSQL only).

    ``SET LOCAL``: the transaction's own setting, gone at its end. For a
    transaction of several records, whose handlers may lock shared rows in
    different orders: PostgreSQL looks for a deadlock only after
    ``deadlock_timeout`` (1 s by default, and only a superuser may change
    it), and meanwhile every worker queued on those rows waits. A wait cut
    short fails with ``lock_not_available``, which the caller takes for a
    lost conflict (:func:`is_conflict` with ``lock_waits``) and redoes the
    records in smaller transactions. InnoDB finds deadlocks at once and
    SQLite writers queue before they begin, so other databases are left as
    they are.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                        {"ms": str(math.ceil(wait / timedelta(milliseconds=1)))})


_SAVEPOINT_STATEMENTS = ("RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")


@contextlib.contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """Run the block in a SAVEPOINT of the session's transaction; roll back to it if the block raises.

    When the savepoint itself cannot be released or rolled back to, the
    database has already rolled back the whole transaction (InnoDB does on a
    deadlock, and on a lock wait timeout with ``innodb_rollback_on_timeout``),
    or the connection is gone: nothing more may run in that transaction.
    :class:`TransientError` is raised then, so that the caller rolls back and
    retries the whole transaction.
    """
    try:
        with session.begin_nested():
            yield
    except sa.exc.DBAPIError as exc:
        if (exc.statement or "").lstrip().upper().startswith(_SAVEPOINT_STATEMENTS):
            raise TransientError(f"the transaction was rolled back under its savepoint: {exc.orig}") from exc
        raise
