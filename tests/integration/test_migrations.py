"""The framework's Alembic migrations against each real database."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from exactlyonce import migrate
from exactlyonce.schema import metadata, processed

from .helpers import REPO_ROOT, engine_for, subprocess_env


def _diff(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": migrate.VERSION_TABLE})
        return list(compare_metadata(context, metadata))


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_matches_metadata_and_downgrade_round_trips(empty_database_url: str) -> None:
    """Upgrade to head yields exactly schema.metadata; downgrade to base drops it; upgrade works again."""
    engine = engine_for(empty_database_url)
    assert migrate.current(engine) is None
    assert processed.name not in _tables(engine)

    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert processed.name in _tables(engine)
    assert _diff(engine) == []

    migrate.downgrade(engine, "base")
    assert migrate.current(engine) is None
    assert processed.name not in _tables(engine)

    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert _diff(engine) == []
    engine.dispose()


def test_cli_db_upgrade(empty_database_url: str) -> None:
    """`python -m exactlyonce db upgrade` with EXACTLYONCE_DATABASE_URL creates the tables and prints the head."""
    result = subprocess.run(
        [sys.executable, "-m", "exactlyonce", "db", "upgrade"],
        cwd=REPO_ROOT, env=subprocess_env(EXACTLYONCE_DATABASE_URL=empty_database_url),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == migrate.head()
    engine = engine_for(empty_database_url)
    assert migrate.current(engine) == migrate.head()
    assert processed.name in _tables(engine)
    assert _diff(engine) == []
    engine.dispose()
