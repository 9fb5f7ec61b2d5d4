"""The docker-only example's test, run on the suite's own broker and PostgreSQL.

``examples/transfer/test_with_containers.py`` gets Kafka and PostgreSQL from
testcontainers and is skipped where no Docker engine answers (as on the
machine that runs CI). Its test function is imported here, so pytest runs it
in this module, with this module's fixtures of the same names: the suite's
broker (topics created as the example's fixture creates them) and a fresh
database on the suite's PostgreSQL server. So the example's body is tested
everywhere; only its two container fixtures need Docker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exactlyonce.testing import fresh_database
from examples.transfer import service
from examples.transfer.test_with_containers import (
    test_transfers_are_applied_once_and_their_events_published,  # noqa: F401 - collected here
)
from tests.integration.helpers import create_topic


@pytest.fixture
def kafka_bootstrap_servers(bootstrap_servers: str) -> str:
    # The service's own topic names (its handler is registered for them); no other test of the suite
    # uses them on the shared broker (the demo suffixes its own).
    for name in (service.TOPIC, service.APPLIED_TOPIC, f"{service.TOPIC}.dlq"):
        create_topic(bootstrap_servers, name, partitions=2)
    return bootstrap_servers


@pytest.fixture
def postgres_url(postgres_url: str) -> Iterator[str]:
    with fresh_database(postgres_url) as url:
        yield url
