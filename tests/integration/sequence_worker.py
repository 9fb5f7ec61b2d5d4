"""A sequenced worker process for the integration tests.

``python -m tests.integration.sequence_worker --bootstrap ... --database-url ...
--topic ... --group ... --name ... [--async]``

Records are JSON ``{"stream": "...", "n": N}``; the handler appends
``(stream, n, worker)`` to ``seq_effects``. The sequence feature must hand it
each stream's numbers 1, 2, 3, ... exactly once, in order, whatever order and
partitions the records arrive in. ``--async``: an ``async def`` handler.
"""

from __future__ import annotations

import argparse
import logging

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import App, Message
from tests.integration.helpers import CONSUMER_CONFIG
from tests.integration.sequence_effects import insert_seq_effect, insert_seq_effect_async, stream_and_number


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--async", dest="is_async", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    app = App(args.group, bootstrap_servers=args.bootstrap, database_url=args.database_url,
              consumer_config=CONSUMER_CONFIG, outbox=False)

    if args.is_async:
        @app.handler(args.topic, sequence=stream_and_number, batch_size=20)
        async def handle_async(message: Message, session: AsyncSession) -> None:
            await insert_seq_effect_async(session, message, worker=args.name)
    else:
        @app.handler(args.topic, sequence=stream_and_number, batch_size=20)
        def handle(message: Message, session: Session) -> None:
            insert_seq_effect(session, message, worker=args.name)

    app.run()


if __name__ == "__main__":
    main()
