"""A non-editable install carries its migrations and can run `exactlyonce db upgrade`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import sqlalchemy as sa

from exactlyonce import migrate

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_and_upgrades_from_outside_the_source_tree(tmp_path: Path) -> None:
    """Build the wheel, install it into a folder, and migrate a SQLite file from another cwd."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=300,
    )
    (wheel,) = wheels.glob("exactlyonce-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "exactlyonce/migrations/env.py" in names
    assert "exactlyonce/migrations/versions/0001_processed.py" in names
    assert "exactlyonce/py.typed" in names
    # The pytest plugin's entry point (a pytest11 group) is in the wheel's metadata.
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]\nexactlyonce = exactlyonce.pytest_plugin" in text
    # The console's templates and its own script and stylesheet (package data).
    for name in ("templates/base.html", "templates/overview.html", "templates/replay.html", "static/console.js",
                 "static/console.css"):
        assert f"exactlyonce/console/{name}" in names, name

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, timeout=300,
    )
    database = tmp_path / "eo.db"
    env = {**os.environ, "PYTHONPATH": str(target),
           "EXACTLYONCE_DATABASE_URL": f"sqlite:///{database}"}
    run = subprocess.run(
        [sys.executable, "-c",
         "import exactlyonce, sys; print(exactlyonce.__file__); "
         "from exactlyonce.cli import main; sys.exit(main(['db', 'upgrade']))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    installed_from, revision = run.stdout.split()
    assert installed_from.startswith(str(target)), "must import the installed copy, not the source tree"
    assert revision == migrate.head()
    assert "exactlyonce_processed" in sa.inspect(sa.create_engine(f"sqlite:///{database}")).get_table_names()
