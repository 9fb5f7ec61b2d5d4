"""A worker process for the integration tests.

``python -m tests.integration.worker --bootstrap ... --database-url ... --topic ...
--group ... --name ... [--crash-after-commit-of ID] [--seen-file PATH] [--async]``

Every record's handler writes one row into ``effects``. The message-ID
strategy appends ``<id> <partition> <offset>`` to ``--seen-file`` for every
record the worker receives, applied or skipped, so a test can tell which
records were redelivered to it.

With ``--crash-after-commit-of ID`` the process SIGKILLs itself right after
the database transaction that applied ``ID`` commits: after the dedup row and
the effect are durable, before the Kafka offset is committed.

With ``--async`` the handler is an ``async def`` one (an ``AsyncSession``, on
the worker's event loop): the same effect, the same crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from exactlyonce import App, Message, ids
from tests.integration.helpers import consumer_config_for, insert_effect, insert_effect_async

_CRASH_FLAG = "exactlyonce-test-crash-after-commit"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--crash-after-commit-of", default=None)
    parser.add_argument("--seen-file", default=None)
    parser.add_argument("--async", dest="is_async", action="store_true")
    parser.add_argument("--kafka-client", default="kafka-python")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    app = App(args.group, bootstrap_servers=args.bootstrap, database_url=args.database_url,
              consumer_config=consumer_config_for(args.kafka_client), kafka_client=args.kafka_client)
    from_header = ids.header()
    seen = open(args.seen_file, "a", buffering=1) if args.seen_file else None  # noqa: SIM115

    def message_id(message: Message) -> str:
        value = from_header(message)
        if seen is not None:
            seen.write(f"{value} {message.partition} {message.offset}\n")
        return value

    if args.is_async:
        @app.handler(args.topic, message_id=message_id)
        async def handle_async(message: Message, session: AsyncSession) -> None:
            value = from_header(message)
            await insert_effect_async(session, value, (message.value or b"").decode(), worker=args.name)
            if value == args.crash_after_commit_of:
                session.info[_CRASH_FLAG] = True  # the info of the session it proxies
    else:
        @app.handler(args.topic, message_id=message_id)
        def handle(message: Message, session: Session) -> None:
            value = from_header(message)
            insert_effect(session, value, (message.value or b"").decode(), worker=args.name)
            if value == args.crash_after_commit_of:
                session.info[_CRASH_FLAG] = True

    @event.listens_for(Session, "after_commit")
    def crash_after_commit(session: Session) -> None:
        if session.info.get(_CRASH_FLAG):
            logging.getLogger("worker").warning("committed %s; SIGKILL before the offset commit",
                                                args.crash_after_commit_of)
            os.kill(os.getpid(), signal.SIGKILL)

    app.run()  # SIGTERM stops it cleanly


if __name__ == "__main__":
    main()
