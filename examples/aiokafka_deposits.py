"""exactlyonce without a framework: ``exactlyonce.claim()`` inside a plain aiokafka consumer loop.

A complete file to copy (the ``faststream`` extra, ``pip install '.[faststream]'``,
brings aiokafka, aiosqlite and psycopg). It needs exactlyonce's tables, and then::

    exactlyonce db upgrade --database-url sqlite:///deposits.db
    EXAMPLE_DATABASE_URL=sqlite+aiosqlite:///deposits.db EXAMPLE_BOOTSTRAP_SERVERS=localhost:9092 \\
        python -m examples.aiokafka_deposits

Each record of ``deposits`` is ``{"deposit_id": "d-1", "account": "acct-1", "amount": 250}``.
For each one, in ONE database transaction: the deposit ID is claimed
(:func:`exactlyonce.claim` inserts the dedup row, or finds it committed
already) and, if the claim is new, the balance grows. Only after the commit
is the offset committed to Kafka. A deposit re-sent by its producer, or read
again because the process died between the database commit and the offset
commit, finds its ID claimed and changes nothing.

What this loop leaves to you (exactlyonce's ``App`` and its FastStream
middleware do it): a record that can never be handled (no usable ID, a
payload that is not a deposit) is only logged and passed over here, where a
service would dead-letter it; and an exception stops the loop, so that the
records whose offsets were not committed are read again at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import exactlyonce
from exactlyonce import Claim, Message, MessageDecodeError, MessageError, ids

log = logging.getLogger("deposits")

TOPIC = os.environ.get("EXAMPLE_TOPIC", "deposits")
GROUP = os.environ.get("EXAMPLE_GROUP", "deposits")
#: The dedup namespace: the same deposit ID under another scope is another message.
SCOPE = f"{GROUP}:{TOPIC}"
MESSAGE_ID = ids.json_field("deposit_id")

metadata = sa.MetaData()
balances = sa.Table(
    "deposit_balances", metadata,
    sa.Column("account", sa.String(64), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
)


def to_message(record: Any) -> Message:
    """An aiokafka ``ConsumerRecord`` as the :class:`exactlyonce.Message` that ``claim`` and ``ids`` read."""
    return Message(topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                   value=record.value, headers=tuple((k, v or b"") for k, v in record.headers),
                   timestamp_ms=record.timestamp)


def parse_deposit(message: Message) -> tuple[str, int]:
    """The deposit's account and amount; :class:`~exactlyonce.MessageDecodeError` if the value is not a deposit."""
    deposit = message.json()
    account = deposit.get("account") if isinstance(deposit, dict) else None
    amount = deposit.get("amount") if isinstance(deposit, dict) else None
    if not isinstance(account, str) or not account or type(amount) is not int or amount <= 0:
        raise MessageDecodeError(f"{message.where()}: not a deposit (an account and a positive integer amount)")
    return account, amount


async def apply_deposit(session: AsyncSession, account: str, amount: int) -> None:
    """The business effect, written through the session that holds the claim."""
    changed = await session.execute(sa.update(balances).where(balances.c.account == account)
                                    .values(balance=balances.c.balance + amount))
    if changed.rowcount == 0:
        await session.execute(sa.insert(balances).values(account=account, balance=amount))


async def handle(engine: AsyncEngine, record: Any) -> Claim | None:
    """Claim and apply one record in one transaction; ``None`` for a record that can never be handled."""
    message = to_message(record)
    try:
        message_id = ids.resolve(MESSAGE_ID, message)
        account, amount = parse_deposit(message)
    except MessageError as exc:
        log.error("passing over %s: %s", message.where(), exc)  # a service would dead-letter it
        return None
    async with AsyncSession(engine) as session, session.begin():
        claimed = await session.run_sync(exactlyonce.claim, SCOPE, message_id, message)
        if claimed is Claim.NEW:
            await apply_deposit(session, account, amount)
    return claimed  # committed: the dedup row and the new balance, or nothing for a duplicate


async def consume(consumer: AIOKafkaConsumer, engine: AsyncEngine, stop: asyncio.Event) -> None:
    """The loop: handle each partition's records in order, then commit the partition's offset."""
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=500)
        for partition, records in batches.items():
            for record in records:
                claimed = await handle(engine, record)
                log.info("%s[%d]@%d: %s", record.topic, record.partition, record.offset,
                         "passed over" if claimed is None else claimed.value)
            # Every record up to here is committed in the database: now, and only now, the offset.
            await consumer.commit({partition: records[-1].offset + 1})


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = create_async_engine(os.environ.get("EXAMPLE_DATABASE_URL", "sqlite+aiosqlite:///deposits.db"))
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    consumer = AIOKafkaConsumer(
        TOPIC, group_id=GROUP, bootstrap_servers=os.environ.get("EXAMPLE_BOOTSTRAP_SERVERS", "localhost:9092"),
        enable_auto_commit=False,  # offsets are committed by the loop, after the database
        auto_offset_reset="earliest",
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await consumer.start()
    try:
        await consume(consumer, engine, stop)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
