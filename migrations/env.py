"""Alembic environment for exactlyonce's own tables.

Run through ``exactlyonce db upgrade`` (or :mod:`exactlyonce.storage.migrate`), which
passes the engine in ``config.attributes["engine"]``.
"""

from __future__ import annotations

from alembic import context

from exactlyonce.storage.migrate import VERSION_TABLE
from exactlyonce.storage.schema import metadata

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    from exactlyonce.storage import engine as _db

    engine = _db.create_engine(config.get_main_option("sqlalchemy.url") or "")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
