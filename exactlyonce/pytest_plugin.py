"""pytest fixtures for testing services built on exactlyonce (a ``pytest11`` plugin).

Installing exactlyonce registers this plugin with pytest; it defines
fixtures only (none of them autouse, no hooks), so it changes nothing in a
test suite that does not ask for them, beyond importing exactlyonce when
pytest starts. ``-p no:exactlyonce`` turns it off.

- ``exactlyonce_bootstrap_servers`` (session): Kafka bootstrap servers:
  ``$EXACTLYONCE_TEST_BOOTSTRAP_SERVERS`` if set, else an embedded broker
  (:class:`exactlyonce.EmbeddedBroker`, tansu, memory only; the ``embedded``
  extra) started for the session.
- ``exactlyonce_database_url`` (each test): a database URL:
  ``$EXACTLYONCE_TEST_DATABASE_URL`` if set (used as it is: the tests share
  it); else, when a Docker engine answers and testcontainers is installed
  (the ``testing`` extra), a new database per test on one PostgreSQL
  container per session; else a new SQLite file per test.
- ``exactlyonce_worker`` (each test): a function ``start(app)`` that runs
  ``app.run()`` in a thread (:class:`exactlyonce.testing.Worker`) and stops
  it when the test ends, raising what ``run()`` raised.

docs/testing.md, "Testing your service", shows them in use.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Loading this module runs exactlyonce's __init__ (the App, kafka-python,
# SQLAlchemy) anyway, so the fixtures' imports gain nothing by waiting.
from exactlyonce.app import App
from exactlyonce.embedded import EmbeddedBroker
from exactlyonce.testing import Worker, docker_available, fresh_database

#: Bootstrap servers of a running broker for the tests (instead of an embedded one).
BOOTSTRAP_SERVERS_ENV = "EXACTLYONCE_TEST_BOOTSTRAP_SERVERS"
#: A database URL for the tests (instead of a container or SQLite).
DATABASE_URL_ENV = "EXACTLYONCE_TEST_DATABASE_URL"
#: The image of the PostgreSQL container.
POSTGRES_IMAGE = "postgres:16-alpine"


@pytest.fixture(scope="session")
def exactlyonce_bootstrap_servers() -> Iterator[str]:
    """Kafka bootstrap servers for the session: ``$EXACTLYONCE_TEST_BOOTSTRAP_SERVERS``, else an embedded broker."""
    servers = os.environ.get(BOOTSTRAP_SERVERS_ENV)
    if servers:
        yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@functools.cache
def _containers_usable() -> bool:
    try:
        importlib.import_module("testcontainers")
    except ImportError:
        return False
    return docker_available()


def _testcontainers_module(name: str) -> Any:
    """``testcontainers.community.<name>`` (4.15 and later), else ``testcontainers.<name>``."""
    try:
        return importlib.import_module(f"testcontainers.community.{name}")
    except ImportError:
        return importlib.import_module(f"testcontainers.{name}")


@pytest.fixture(scope="session")
def _exactlyonce_postgres_server() -> Iterator[str | None]:
    """The PostgreSQL container's URL when the database fixture uses one (``None``: it does not)."""
    if os.environ.get(DATABASE_URL_ENV) or not _containers_usable():
        yield None
        return
    postgres = _testcontainers_module("postgres")
    with postgres.PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield str(container.get_connection_url())


@pytest.fixture
def exactlyonce_database_url(_exactlyonce_postgres_server: str | None, tmp_path: Path) -> Iterator[str]:
    """A database URL for this test: ``$EXACTLYONCE_TEST_DATABASE_URL``, else a fresh PostgreSQL database
    in a container when Docker answers, else a new SQLite file."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        yield url
        return
    if _exactlyonce_postgres_server is not None:
        with fresh_database(_exactlyonce_postgres_server) as fresh:
            yield fresh
        return
    yield f"sqlite:///{tmp_path / 'exactlyonce.db'}"


@pytest.fixture
def exactlyonce_worker() -> Iterator[Callable[..., Worker]]:
    """``start(app, **options) -> Worker``: ``app.run()`` in a thread, stopped when the test ends.

    ``options`` go to :class:`exactlyonce.testing.Worker` (``stop_timeout``).
    The App runs as configured (its arguments, else the ``EXACTLYONCE_*``
    environment variables). At teardown every worker is stopped, and the
    first error a ``run()`` raised fails the test.
    """
    workers: list[Worker] = []

    def start(app: App, **options: Any) -> Worker:
        worker = Worker(app, **options).start()
        workers.append(worker)
        return worker

    yield start
    errors: list[BaseException] = []
    for worker in reversed(workers):
        try:
            worker.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
