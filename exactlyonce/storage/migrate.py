"""Apply the framework's Alembic migrations to a database.

The migrations ship inside the wheel (``exactlyonce/migrations``); in a source
checkout they are the top-level ``migrations/`` folder. They record their
version in ``exactlyonce_alembic_version``, so they never collide with the
application's own Alembic history (``alembic_version``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from exactlyonce.errors import ConfigurationError

VERSION_TABLE = "exactlyonce_alembic_version"


def migrations_path() -> Path:
    """Where the Alembic environment is: inside the package, else the source tree."""
    packaged = Path(str(importlib.resources.files("exactlyonce"))) / "migrations"
    source = Path(__file__).resolve().parents[2] / "migrations"
    for candidate in (packaged, source):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("exactlyonce's migrations are missing from this installation")


def alembic_config(engine: Engine) -> Config:
    """An Alembic ``Config`` bound to ``engine`` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["engine"] = engine
    return config


def head() -> str:
    """The newest revision the shipped migrations define."""
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    revision = ScriptDirectory.from_config(config).get_current_head()
    assert revision is not None, "the migrations define no revision"
    return revision


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the framework's tables to ``revision``."""
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Downgrade the framework's tables to ``revision`` (``base`` drops them)."""
    command.downgrade(alembic_config(engine), revision)


def current(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def require_tables(engine: Engine, *tables: sa.Table) -> None:
    """Raise :class:`ConfigurationError` naming the ``tables`` (or their columns) the database lacks.

    A database a revision behind the code has every table but not every
    column: its first write would fail with an SQL error. This says what to
    do instead: run ``exactlyonce db upgrade``.
    """
    inspector = sa.inspect(engine)
    missing = [table.name for table in tables if not inspector.has_table(table.name)]
    if missing:
        raise ConfigurationError(
            f"table(s) {', '.join(missing)} missing: the database is not at the framework's current "
            "revision; run `exactlyonce db upgrade` first"
        )
    lacking = []
    for table in tables:
        present = {found["name"] for found in inspector.get_columns(table.name)}
        lacking += [f"{table.name}.{column.name}" for column in table.columns if column.name not in present]
    if lacking:
        raise ConfigurationError(
            f"column(s) {', '.join(lacking)} missing: the database is not at the framework's current "
            "revision; run `exactlyonce db upgrade` first"
        )
