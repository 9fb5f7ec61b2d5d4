"""Database seam: URL defaults and which failures count as transient."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from exactlyonce import ConfigurationError, _db


@pytest.mark.parametrize(("url", "driver"), [
    ("postgresql://u@h/db", "postgresql+psycopg"),
    ("mysql://u@h/db", "mysql+pymysql"),
    ("mariadb://u@h/db", "mariadb+pymysql"),
    ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
    ("sqlite:///x.db", "sqlite"),
])
def test_default_drivers(url: str, driver: str) -> None:
    """A URL without a driver gets the tested one; an explicit driver is kept."""
    assert _db.normalize_url(url).drivername == driver


@pytest.mark.parametrize(("url", "driver"), [
    ("postgresql://u@h/db", "postgresql+psycopg"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
    ("mysql://u@h/db", "mysql+asyncmy"),
    ("mysql+pymysql://u@h/db", "mysql+asyncmy"),
    ("mariadb://u@h/db", "mariadb+asyncmy"),
    ("mariadb+pymysql://u@h/db", "mariadb+asyncmy"),
    ("sqlite:///x.db", "sqlite+aiosqlite"),
    ("sqlite+pysqlite:///x.db", "sqlite+aiosqlite"),
    ("mysql+aiomysql://u@h/db", "mysql+aiomysql"),
    ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
])
def test_default_async_drivers(url: str, driver: str) -> None:
    """For async handlers: the tested async driver for a URL without one or with a tested sync one; others kept."""
    assert _db.normalize_async_url(url).drivername == driver


def test_an_async_engine_needs_an_async_driver() -> None:
    """A sync-only driver for an async engine is a configuration error naming the async extras."""
    with pytest.raises(ConfigurationError, match=r"exactlyonce\[postgres-async\]"):
        _db.create_async_engine("postgresql+psycopg2://u@h/db")


def test_invalid_url_is_a_configuration_error() -> None:
    """A malformed URL is reported as configuration, not a crash."""
    with pytest.raises(ConfigurationError):
        _db.normalize_url("not a url")


def _operational(orig: Exception) -> sa.exc.OperationalError:
    return sa.exc.OperationalError("stmt", {}, orig)


def test_sqlite_lock_is_transient_but_missing_table_is_not() -> None:
    """SQLite's OperationalError is transient only for a busy/locked database."""
    assert _db.is_transient(_operational(sqlite3.OperationalError("database is locked")))
    assert not _db.is_transient(_operational(sqlite3.OperationalError("no such table: x")))


def test_server_operational_errors_and_lost_connections_are_transient() -> None:
    """Server OperationalErrors (connection lost, deadlock) and invalidated connections retry."""
    assert _db.is_transient(_operational(ConnectionError("server closed the connection")))
    lost = sa.exc.DBAPIError("stmt", {}, Exception("x"), connection_invalidated=True)
    assert _db.is_transient(lost)


def test_integrity_and_programming_errors_are_not_transient() -> None:
    """Constraint violations and SQL errors are not retried as transient."""
    assert not _db.is_transient(sa.exc.IntegrityError("stmt", {}, Exception("dup")))
    assert not _db.is_transient(sa.exc.ProgrammingError("stmt", {}, Exception("syntax")))
    assert not _db.is_transient(ValueError("handler bug"))


def test_mysql_errors_are_transient_only_for_connection_and_lock_codes() -> None:
    """PyMySQL's OperationalError is transient for deadlocks and lost connections, not for SQL errors."""
    import pymysql

    assert _db.is_transient(_operational(pymysql.err.OperationalError(1213, "Deadlock found")))
    assert _db.is_transient(_operational(pymysql.err.OperationalError(2013, "Lost connection")))
    assert not _db.is_transient(_operational(pymysql.err.OperationalError(1054, "Unknown column")))
    # MariaDB 11.6+ (innodb_snapshot_isolation): a write conflict, retried like a deadlock.
    changed = _operational(pymysql.err.OperationalError(1020, "Record has changed since last read in table 't'"))
    assert _db.is_transient(changed) and _db.is_conflict(changed)


def test_asyncmy_errors_are_classified_as_pymysqls() -> None:
    """The async MySQL driver's errors: the same codes are transient, and 1213 is a conflict (redone smaller)."""
    from asyncmy import errors

    assert _db.is_transient(_operational(errors.OperationalError(1205, "Lock wait timeout exceeded")))
    assert _db.is_transient(_operational(errors.OperationalError(1213, "Deadlock found")))
    assert _db.is_conflict(_operational(errors.OperationalError(1213, "Deadlock found")))
    assert not _db.is_transient(_operational(errors.OperationalError(1054, "Unknown column")))
    assert not _db.is_conflict(_operational(errors.OperationalError(1205, "Lock wait timeout exceeded")))



def test_a_lock_wait_timeout_is_a_conflict_only_where_lock_waits_are_bounded() -> None:
    """PostgreSQL's lock timeout in a transaction whose waits were cut short is lost like a deadlock.

    Anywhere else (InnoDB's 1205 comes after the full lock_timeout) it is a
    transient failure, not a conflict.
    """
    import psycopg
    import pymysql

    timeout = _operational(psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"))
    assert _db.is_transient(timeout)
    assert not _db.is_conflict(timeout)
    assert _db.is_conflict(timeout, lock_waits=True)
    innodb = _operational(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"))
    assert _db.is_transient(innodb) and not _db.is_conflict(innodb, lock_waits=True)
    for deadlock in (_operational(psycopg.errors.DeadlockDetected("deadlock detected")),
                     _operational(pymysql.err.OperationalError(1213, "Deadlock found"))):
        assert _db.is_conflict(deadlock) and _db.is_conflict(deadlock, lock_waits=True)
    other = _operational(psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))
    assert not _db.is_conflict(other, lock_waits=True)


def test_an_error_raised_from_or_while_handling_a_transient_one_is_transient_when_chained() -> None:
    """A handler that wraps a deadlock still failed on a deadlock."""
    import pymysql

    deadlock = _operational(pymysql.err.OperationalError(1213, "Deadlock found"))
    try:
        try:
            raise deadlock
        except sa.exc.OperationalError as exc:
            raise RuntimeError("could not move the money") from exc
    except RuntimeError as wrapped:
        assert not _db.is_transient(wrapped)
        assert _db.is_transient(wrapped, chained=True)
    assert not _db.is_transient(ValueError("handler bug"), chained=True)


def test_a_savepoint_the_database_already_discarded_raises_transient(tmp_path: object) -> None:
    """When the whole transaction is gone under a savepoint, nothing more runs in it: TransientError."""
    from sqlalchemy.orm import Session

    from exactlyonce import TransientError

    engine = _db.create_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with pytest.raises(TransientError), Session(engine) as session, session.begin():
            session.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            # A failure the savepoint contains: rolled back to, re-raised as is.
            with pytest.raises(ZeroDivisionError), _db.savepoint(session):
                session.execute(sa.text("INSERT INTO t VALUES (1)"))
                raise ZeroDivisionError
            assert session.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 0
            # The transaction ends under the savepoint (as InnoDB ends it on a
            # deadlock): rolling back to the savepoint fails, and the error
            # leaves the whole transaction (whose own rollback succeeds).
            with _db.savepoint(session):
                session.connection().exec_driver_sql("ROLLBACK")
                raise ZeroDivisionError
    finally:
        engine.dispose()
