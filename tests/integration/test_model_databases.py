"""The model-based test of the runtime (tests/model.py) on PostgreSQL and MariaDB.

The same state machine as ``tests/unit/test_model.py`` (real Runners, the
in-memory twins of Kafka), against a real server: the dialects' claims
(``unnest`` on PostgreSQL, a row at a time and error 1062 on MariaDB), their
transient-error classes and their collations are what differ. With def
handlers and with async def ones (psycopg's async mode, asyncmy).
"""

from __future__ import annotations

import pytest

from tests.conftest import drop_all_tables
from tests.unit.test_model import run_model


@pytest.mark.service
@pytest.mark.parametrize("server", ["postgres_url", "mysql_url"], ids=["postgresql", "mariadb"])
def test_runtime_model_on_a_server(server: str, handler_kind: str, request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue(server)
    drop_all_tables(url)
    run_model(url, handler_kind)
