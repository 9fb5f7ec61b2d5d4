"""The framework's own path, without Kafka: a dedup-only batch handler over the in-memory twin consumer.

``python -m bench.framework DATABASE_URL [--records N]`` fills a twin topic
with JSON transfers, runs one real :class:`~exactlyonce.runtime.Runner` of a
batch handler that only decodes each record over it (IDs resolved, claimed,
counted and committed as a worker does), and prints records per second. No
broker and no handler SQL: what is left is exactlyonce's Python and its
claim, counters and commit on the database. For a profile, run it under
``py-spy record --format raw -o out.txt -- python -m bench.framework ...``.
It is not part of ``make bench`` (that measures against a real broker);
compare runs of it with each other on one machine, one after the other.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from exactlyonce import App, Message, ids
from exactlyonce.storage import migrate
from exactlyonce.testing import Cluster


def run(url: str, records: int, partitions: int = 4) -> float:
    """Records per second of one Runner deciding ``records`` fresh records; asserts each was applied once."""
    app = App("bench-framework", bootstrap_servers="twin:9092", database_url=url, outbox=False)

    @app.handler("transfers", batch=True, message_id=ids.json_field("transfer_id"))
    def decode_only(messages: list[Message], session: Any) -> None:
        for message in messages:
            message.json()

    migrate.upgrade(app.engine)
    cluster = Cluster()
    cluster.create_topic("transfers", partitions)
    for n in range(records):
        value = {"transfer_id": str(uuid.uuid4()), "from": "acct-1", "to": "acct-2", "amount": 1}
        cluster.append("transfers", n % partitions, value=json.dumps(value).encode())
    start = time.perf_counter()
    runner = cluster.run_until_read(app)
    elapsed = time.perf_counter() - start
    app.engine.dispose()
    if runner.stats["applied"] != records:
        raise SystemExit(f"expected {records} records applied, got {dict(runner.stats)}")
    return records / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url", help="an empty database or one to add to (each run claims new IDs)")
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    print(f"{run(args.database_url, args.records):,.0f} records/s")


if __name__ == "__main__":
    main()
