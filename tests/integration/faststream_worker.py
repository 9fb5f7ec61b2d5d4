"""A FastStream service process for the tests, which can die between a record's commit and its ack.

``python -m tests.integration.faststream_worker example`` runs the example
service (examples/faststream_transfer.py, configured by its ``EXAMPLE_*``
variables); ``... effects`` runs a subscriber that inserts one row per
record into the tests' ``effects`` table, whose ``message_id`` is not unique
(an effect applied twice shows as two rows), on ``EXAMPLE_DATABASE_URL``,
``EXAMPLE_TOPIC`` and ``EXAMPLE_GROUP``.

With ``CRASH_AFTER_COMMIT=<id>`` the process dies (``os._exit(3)``, no
clean-up, as a killed worker) when the middleware acknowledges the record of
that transfer ID (``example``) or ``message-id`` header (``effects``): after
its database transaction committed, before its offset is committed to Kafka.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import sqlalchemy as sa
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaRouter
from faststream.kafka.message import KafkaAckableMessage
from sqlalchemy.ext.asyncio import create_async_engine

# At module level: FastStream resolves the subscriber's annotations in this module's namespace.
from exactlyonce.faststream import ExactlyOnce, MessageId, Session
from tests.integration.helpers import effects

CRASH_EXIT_CODE = 3


def _transfer_id(message: Any) -> object:
    try:
        return json.loads(message.body).get("transfer_id")
    except (ValueError, AttributeError):
        return None


def _crash_before_acking(record_id: str, id_of: Any) -> None:
    original = KafkaAckableMessage.ack

    async def ack(self: KafkaAckableMessage) -> None:
        if id_of(self) == record_id:
            os._exit(CRASH_EXIT_CODE)
        await original(self)

    KafkaAckableMessage.ack = ack  # type: ignore[method-assign]


def effects_app() -> FastStream:
    engine = create_async_engine(os.environ["EXAMPLE_DATABASE_URL"])
    router = KafkaRouter(middlewares=[ExactlyOnce(engine)])

    @router.subscriber(os.environ["EXAMPLE_TOPIC"], group_id=os.environ["EXAMPLE_GROUP"],
                       ack_policy=AckPolicy.MANUAL, auto_offset_reset="earliest", session_timeout_ms=6000,
                       heartbeat_interval_ms=1000)
    async def apply(body: bytes, session: Session, message_id: MessageId) -> None:
        await session.execute(sa.insert(effects).values(message_id=message_id, payload=body.decode(),
                                                        worker=str(os.getpid())))

    broker = KafkaBroker(os.environ["EXAMPLE_BOOTSTRAP_SERVERS"])
    broker.include_router(router)
    return FastStream(broker)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "example":
        from examples import faststream_transfer

        app, id_of = faststream_transfer.app, _transfer_id
    else:
        app, id_of = effects_app(), lambda message: message.headers.get("message-id")
    if os.environ.get("CRASH_AFTER_COMMIT"):
        _crash_before_acking(os.environ["CRASH_AFTER_COMMIT"], id_of)
    asyncio.run(app.run())
