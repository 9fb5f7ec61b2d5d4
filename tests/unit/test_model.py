"""The model-based test of the runtime (tests/model.py) on SQLite: real Runners, in-memory twins of Kafka."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis.stateful import run_state_machine_as_test

from exactlyonce import _db, migrate
from tests.model import RuntimeModel, effects_metadata, model_settings


def prepare(url: str) -> None:
    """Upgrade ``url`` to the framework's head and create the model's effects table."""
    engine = _db.create_engine(url)
    try:
        migrate.upgrade(engine)
        effects_metadata.create_all(engine)
    finally:
        engine.dispose()


def run_model(url: str, kind: str = "sync") -> None:
    prepare(url)

    class Model(RuntimeModel):
        database_url = url
        handler_kind = kind

    run_state_machine_as_test(Model, settings=model_settings())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_runtime_model_on_sqlite(tmp_path: Path, kind: str) -> None:
    """The model with def handlers, and with async def ones (each Runner on its own event loop, aiosqlite)."""
    run_model(f"sqlite:///{tmp_path / 'model.db'}", kind)


def test_effects_table_has_no_unique_constraint() -> None:
    from tests.model import model_effects

    assert not [c for c in model_effects.constraints if isinstance(c, sa.UniqueConstraint)]
    assert not [i for i in model_effects.indexes if i.unique]
