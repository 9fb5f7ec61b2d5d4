"""Service selection for the tests: a Kafka broker and three databases.

Broker (``bootstrap_servers``, one per session):

1. ``$EXACTLYONCE_TEST_BOOTSTRAP_SERVERS`` if set;
2. else the kind ``$EXACTLYONCE_TEST_BROKER`` names (``kafka``, ``tansu`` or
   ``docker``; see :mod:`tests.services.brokers`), by default a testcontainers
   Kafka when a Docker engine answers and otherwise Apache Kafka from Maven
   Central, started here in KRaft mode (:mod:`tests.services.kafka`).

``kafka_cluster`` is a three-node Apache Kafka cluster (replication factor 3,
``min.insync.replicas=2``) for the failover tests, one per test module.

PostgreSQL / MariaDB (``postgres_url`` / ``mysql_url``, one per session):

1. ``$EXACTLYONCE_TEST_POSTGRES_URL`` / ``$EXACTLYONCE_TEST_MYSQL_URL`` if set;
2. a testcontainers container (``postgres:16-alpine`` / ``mariadb:11``) when a
   Docker engine answers;
3. a local server on the default port when it answers ``SELECT 1``; when it
   does not, on Debian/Ubuntu as root ``tests/services/databases.sh`` (what
   ``make services`` runs) installs and starts both servers, once a session;
4. otherwise the test is skipped with the reason -- or FAILS when ``CI=true``,
   so that CI cannot pass by skipping.

``database_url`` runs a test on SQLite, PostgreSQL and MariaDB, each time on a
clean database (every table dropped) upgraded to the framework's head
revision; ``empty_database_url`` is the same without the upgrade.

Browser (``chromium``, one per test module): Debian's ``/usr/bin/chromium``,
installed by ``tests/services/chromium.sh`` when missing (Debian/Ubuntu as
root), driven by Playwright for Python through ``executable_path`` (Playwright
never downloads a browser here). A Chromium that cannot start skips the test,
or fails it under ``CI=true``.

``handler_kind`` runs a test with a sync handler and with an ``async def`` one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa

BROKER_ENV = "EXACTLYONCE_TEST_BOOTSTRAP_SERVERS"
POSTGRES_ENV = "EXACTLYONCE_TEST_POSTGRES_URL"
MYSQL_ENV = "EXACTLYONCE_TEST_MYSQL_URL"

# What tests/services/databases.sh (`make services`) sets up.
LOCAL_POSTGRES_URL = "postgresql://postgres:postgres@127.0.0.1:5432/test"
LOCAL_MYSQL_URL = "mysql://root:root@127.0.0.1:3306/test"
SERVICES_SCRIPT = Path(__file__).parent / "services" / "databases.sh"

POSTGRES_IMAGE = "postgres:16-alpine"
MARIADB_IMAGE = "mariadb:11"

DATABASES = ["sqlite", "postgresql", "mysql"]
DATABASE_IDS = ["sqlite", "postgresql", "mariadb"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_SCRIPT = Path(__file__).parent / "services" / "chromium.sh"
#: Headless, as root (no sandbox), no GPU, no calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

#: The guarantee tests' handlers: ``def handler(message, session)`` and ``async def handler(message, session)``.
HANDLER_KINDS = ["sync", "async"]

# Fixtures that need a service; tests using them get the ``service`` marker.
_SERVICE_FIXTURES = {"bootstrap_servers", "database_url", "empty_database_url", "postgres_url",
                     "mysql_url", "kafka_cluster", "chromium"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    needs: set[str] = set()
    for item in items:
        used = _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            item.add_marker(pytest.mark.service)
            needs |= used
    _prepare_services(needs)


def _prepare_services(needs: set[str]) -> None:
    """Install what the collected tests will need before any test runs.

    On a fresh machine that means installing the databases (minutes of
    apt-get) and fetching Kafka's jars: done here, that time does not count
    against the first test's timeout. Whatever fails here is reported by the
    fixtures later, in the tests that need the service.
    """
    if "chromium" in needs:
        _set_up_chromium()
    if not needs or docker_available():
        return
    wants_database = bool(needs & {"database_url", "empty_database_url", "postgres_url", "mysql_url"})
    if wants_database and not (os.environ.get(POSTGRES_ENV) and os.environ.get(MYSQL_ENV)) and (
        _local_server_answers(LOCAL_POSTGRES_URL) or _local_server_answers(LOCAL_MYSQL_URL)
    ):
        _set_up_local_databases()
    wants_kafka = bool(needs & {"bootstrap_servers", "kafka_cluster"})
    if wants_kafka and not os.environ.get(BROKER_ENV):
        from tests.services.brokers import BrokerUnavailable, private_kind
        from tests.services.kafka import KafkaUnavailable, jars_dir

        with contextlib.suppress(BrokerUnavailable, KafkaUnavailable):
            if private_kind() == "kafka" or "kafka_cluster" in needs:
                jars_dir()


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under ``CI=true``: CI must not pass by skipping."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine answers (checked once, quickly)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _testcontainers(name: str) -> Any:
    """Import ``testcontainers.<name>`` (``testcontainers.community.<name>`` from 4.15)."""
    import importlib

    try:
        return importlib.import_module(f"testcontainers.community.{name}")
    except ImportError:
        return importlib.import_module(f"testcontainers.{name}")


def _local_server_answers(url: str) -> str | None:
    """``None`` when a TCP connection and ``SELECT 1`` succeed, else why not."""
    from exactlyonce import _db

    parsed = _db.normalize_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port), timeout=2):
            pass
    except OSError as exc:
        return f"nothing listens on {parsed.host}:{parsed.port} ({exc})"
    engine = _db.create_engine(parsed, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            if conn.execute(sa.text("SELECT 1")).scalar_one() != 1:
                return "SELECT 1 did not return 1"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.dispose()
    return None


def _database_service(env: str, local_url: str, container: str, label: str) -> Iterator[str]:
    url = os.environ.get(env)
    if url:
        yield url
        return
    if docker_available():
        if container == "postgres":
            module = _testcontainers("postgres")
            with module.PostgresContainer(POSTGRES_IMAGE, driver=None) as pg:
                yield pg.get_connection_url()
        else:
            module = _testcontainers("mysql")
            with module.MySqlContainer(MARIADB_IMAGE) as db:
                yield db.get_connection_url()
        return
    problem = _local_server_answers(local_url)
    if problem is not None:
        setup = _set_up_local_databases()
        problem = _local_server_answers(local_url) if setup is None else f"{problem}; {setup}"
    if problem is None:
        yield local_url
        return
    unavailable(f"no {label}: set {env}, run a Docker engine, or run `make services` "
                f"for a local server at {local_url} ({problem})")


@functools.cache
def _set_up_local_databases() -> str | None:
    """Run tests/services/databases.sh once (Debian/Ubuntu as root); ``None`` if it succeeded, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return ("install and start PostgreSQL and MariaDB (tests/services/databases.sh does it "
                "on Debian/Ubuntu as root)")
    result = subprocess.run(["bash", str(SERVICES_SCRIPT)], capture_output=True, text=True,
                            timeout=900, check=False)
    if result.returncode != 0:
        return f"{SERVICES_SCRIPT.name} failed: {(result.stdout + result.stderr).strip()[-300:]}"
    return None


@functools.cache
def _set_up_chromium() -> str | None:
    """Run tests/services/chromium.sh once if /usr/bin/chromium is missing; ``None`` if it is there, else why not."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"install Debian's chromium package ({CHROMIUM_SCRIPT.name} does it on Debian/Ubuntu as root)"
    result = subprocess.run(["bash", str(CHROMIUM_SCRIPT)], capture_output=True, text=True, timeout=900,
                            check=False)
    if result.returncode != 0 or not CHROMIUM.exists():
        return f"{CHROMIUM_SCRIPT.name} failed: {(result.stdout + result.stderr).strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Debian's) driven by Playwright: a ``playwright.sync_api.Browser``.

    Module-scoped: Playwright's sync API keeps an asyncio event loop running
    in the main thread while it is started, so a later test's
    ``asyncio.run()`` would fail ("cannot be called from a running event
    loop") if it lived for the whole session.
    """
    problem = _set_up_chromium()
    if problem is not None:
        unavailable(f"no Chromium: {problem}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"Playwright for Python is not installed (pip install -e '.[dev]'): {exc}")
    manager = sync_playwright().start()
    try:
        browser = manager.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    except Exception as exc:
        manager.stop()
        unavailable(f"Chromium ({CHROMIUM}) did not start: {str(exc).strip()[:500]}")
    try:
        yield browser
    finally:
        browser.close()
        manager.stop()


@pytest.fixture(scope="session")
def broker_kind() -> str:
    """``kafka``, ``tansu``, ``docker``, or ``external`` when the tests were given bootstrap servers."""
    from tests.services.brokers import BrokerUnavailable, selected_kind

    if os.environ.get(BROKER_ENV):
        return "external"
    try:
        return selected_kind()
    except BrokerUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def bootstrap_servers(broker_kind: str) -> Iterator[str]:
    """Kafka bootstrap servers shared by the whole session."""
    from tests.services.brokers import BrokerUnavailable, private_broker

    if broker_kind == "external":
        yield os.environ[BROKER_ENV]
        return
    if broker_kind == "docker":
        module = _testcontainers("kafka")
        with module.KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    stack = contextlib.ExitStack()
    try:
        servers = stack.enter_context(private_broker())
    except BrokerUnavailable as exc:
        unavailable(f"no {broker_kind} broker: {exc}")
    with stack:
        yield servers


@pytest.fixture(scope="module")
def kafka_cluster() -> Iterator[Any]:
    """A three-node Apache Kafka cluster of this module's own (the failover tests kill its nodes)."""
    from tests.services.kafka import KafkaCluster, KafkaUnavailable

    cluster = KafkaCluster(3)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        unavailable(f"no Apache Kafka cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server URL for the session."""
    yield from _database_service(POSTGRES_ENV, LOCAL_POSTGRES_URL, "postgres", "PostgreSQL")


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A MariaDB (or MySQL) server URL for the session."""
    yield from _database_service(MYSQL_ENV, LOCAL_MYSQL_URL, "mysql", "MariaDB")


def drop_all_tables(url: str) -> None:
    """Drop every table in the URL's database (default schema)."""
    from exactlyonce import _db

    engine = _db.create_engine(url)
    try:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        metadata.drop_all(engine)
    finally:
        engine.dispose()


def _clean_database(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    kind = request.param
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_url" if kind == "postgresql" else "mysql_url")
    drop_all_tables(url)
    return url


@pytest.fixture(params=HANDLER_KINDS)
def handler_kind(request: pytest.FixtureRequest) -> str:
    """``sync`` (a plain def handler) or ``async`` (an async def one): the guarantee tests run with both."""
    return str(request.param)


@pytest.fixture(params=DATABASES, ids=DATABASE_IDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A database with no tables at all (SQLite file, PostgreSQL, MariaDB)."""
    return _clean_database(request, tmp_path)


@pytest.fixture(params=DATABASES, ids=DATABASE_IDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A clean database upgraded to the framework's head revision."""
    from exactlyonce import _db, migrate

    url = _clean_database(request, tmp_path)
    engine = _db.create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    yield url
