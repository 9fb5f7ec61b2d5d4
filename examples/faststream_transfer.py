"""A FastStream service that moves money between accounts, each transfer exactly once.

A complete file to copy. It needs the ``faststream`` extra (``pip install '.[faststream]'``),
exactlyonce's tables in the database, and then::

    exactlyonce db upgrade --database-url sqlite:///bank.db
    EXAMPLE_DATABASE_URL=sqlite+aiosqlite:///bank.db EXAMPLE_BOOTSTRAP_SERVERS=localhost:9092 \\
        python -m examples.faststream_transfer

(On PostgreSQL: ``postgresql+psycopg://user:password@host/db`` for both.)
The service creates its own tables and a few accounts at start-up.

Each record of ``bank-transfers`` is a JSON transfer::

    {"transfer_id": "t-1", "from": "acct-1", "to": "acct-2", "amount": 250}

The subscriber debits and credits the accounts and records the transfer in
the transaction in which exactlyonce claims the ``transfer_id``. A transfer
that is sent twice, or read again after a crash between the database commit
and the offset commit, is skipped; a transfer the subscriber cannot handle
(an unknown account, a payload that is not a transfer) is dead-lettered to
``bank-transfers.dlq`` with exactlyonce's headers, where ``exactlyonce dlq
list`` shows it. An overdraft is a business outcome: the transfer is
recorded as rejected.
"""

from __future__ import annotations

import asyncio
import os

import sqlalchemy as sa
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import create_async_engine

from exactlyonce import DeadLetter, ids
from exactlyonce.faststream import ExactlyOnce, Session

BOOTSTRAP_SERVERS = os.environ.get("EXAMPLE_BOOTSTRAP_SERVERS", "localhost:9092")
DATABASE_URL = os.environ.get("EXAMPLE_DATABASE_URL", "sqlite+aiosqlite:///bank.db")
TOPIC = os.environ.get("EXAMPLE_TOPIC", "bank-transfers")
GROUP = os.environ.get("EXAMPLE_GROUP", "bank")
#: Accounts created at start-up when there are none: acct-1 ... acct-N, each with this many cents.
ACCOUNTS, OPENING_BALANCE = 5, 1_000

metadata = sa.MetaData()
accounts = sa.Table(
    "bank_accounts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.CheckConstraint("balance >= 0", name="ck_bank_accounts_balance"),
)
transfers = sa.Table(
    "bank_transfers", metadata,
    sa.Column("transfer_id", sa.String(200), primary_key=True),
    sa.Column("from_account", sa.String(64), nullable=False),
    sa.Column("to_account", sa.String(64), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # applied | rejected
)


class Transfer(BaseModel):
    """A record of ``bank-transfers``, validated by FastStream before the subscriber runs."""

    model_config = ConfigDict(populate_by_name=True)

    transfer_id: str = Field(min_length=1, max_length=200)
    from_account: str = Field(alias="from", min_length=1, max_length=64)
    to_account: str = Field(alias="to", min_length=1, max_length=64)
    amount: int = Field(gt=0)


engine = create_async_engine(DATABASE_URL)

# Every subscriber of this router is effectively-once; the transfer ID is the message ID.
router = KafkaRouter(middlewares=[ExactlyOnce(engine, message_id=ids.json_field("transfer_id"))])


@router.subscriber(TOPIC, group_id=GROUP, ack_policy=AckPolicy.MANUAL, auto_offset_reset="earliest")
async def apply_transfer(transfer: Transfer, session: Session) -> None:
    """Move the money and record the transfer, in the transaction that holds the claim."""
    ids_ = sorted({transfer.from_account, transfer.to_account})  # lock in one order: no deadlocks
    rows = await session.execute(sa.select(accounts).where(accounts.c.id.in_(ids_))
                                 .order_by(accounts.c.id).with_for_update())
    balances = {row.id: row.balance for row in rows}
    unknown = sorted(set(ids_) - set(balances))
    if unknown:
        raise DeadLetter(f"unknown account {unknown[0]}")  # dead-lettered at once, not retried
    status = "applied" if balances[transfer.from_account] >= transfer.amount else "rejected"
    if status == "applied":
        for account, change in ((transfer.from_account, -transfer.amount), (transfer.to_account, transfer.amount)):
            await session.execute(sa.update(accounts).where(accounts.c.id == account)
                                  .values(balance=accounts.c.balance + change))
    await session.execute(sa.insert(transfers).values(
        transfer_id=transfer.transfer_id, from_account=transfer.from_account, to_account=transfer.to_account,
        amount=transfer.amount, status=status))


# acks="all": a dead letter counts as sent once every in-sync replica has it (FastStream's default is 1).
broker = KafkaBroker(BOOTSTRAP_SERVERS, acks="all")
broker.include_router(router)
app = FastStream(broker)


@app.on_startup
async def create_tables() -> None:
    """Create the service's tables, and the accounts if there are none (exactlyonce's: ``exactlyonce db upgrade``)."""
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        if (await connection.execute(sa.select(sa.func.count()).select_from(accounts))).scalar_one() == 0:
            await connection.execute(sa.insert(accounts), [
                {"id": f"acct-{n}", "balance": OPENING_BALANCE} for n in range(1, ACCOUNTS + 1)])


@app.after_shutdown
async def close_engine() -> None:
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(app.run())
