"""The example's own tables: account balances and the transfer ledger.

They live on their own ``MetaData``, apart from exactlyonce's tables
(``exactlyonce_*``, created by ``exactlyonce db upgrade``): a real application
would manage them with its own migrations. Money is an integer number of cents.

``python -m examples.transfer.models --accounts 100 --balance 10000`` creates
the tables if they are missing and seeds the accounts if there are none (the
docker-compose ``migrate`` service runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import _db
from exactlyonce.app import DATABASE_URL_ENV

#: Transfer statuses: ``applied`` moved the money, ``rejected`` did not (see ``reason``).
APPLIED = "applied"
REJECTED = "rejected"

#: Reasons a transfer is rejected: business outcomes, recorded like any other.
UNKNOWN_ACCOUNT = "unknown-account"
INSUFFICIENT_FUNDS = "insufficient-funds"

#: The two sides of an applied transfer, as published on ``transfer-applied``.
DEBIT = "debit"
CREDIT = "credit"

ACCOUNT_ID_LENGTH = 64
TRANSFER_ID_LENGTH = 255
#: The longest transfer ID the service accepts: its events' message IDs,
#: ``<transfer_id>:credit``, must fit exactlyonce's 255 characters.
MAX_TRANSFER_ID = TRANSFER_ID_LENGTH - len(":" + CREDIT)

DEFAULT_ACCOUNTS = 100
#: 100.00 in cents.
DEFAULT_BALANCE = 10_000

metadata = sa.MetaData()

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.String(ACCOUNT_ID_LENGTH), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
    # Statement entries so far: every applied transfer adds one to each of its
    # two accounts, in the transaction that moves the money, and publishes the
    # new value as the entry's sequence number (see service.py). The ledger
    # service uses it to put each account's statement lines in order.
    sa.Column("entries", sa.BigInteger, nullable=False, default=0, server_default="0"),
    # A last line of defence: the handler never overdraws, the database agrees.
    sa.CheckConstraint("balance >= 0", name="ck_accounts_balance_not_negative"),
)

transfers = sa.Table(
    "transfers",
    metadata,
    sa.Column("transfer_id", sa.String(TRANSFER_ID_LENGTH), primary_key=True),
    sa.Column("from_account", sa.String(ACCOUNT_ID_LENGTH), nullable=False),
    sa.Column("to_account", sa.String(ACCOUNT_ID_LENGTH), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=True),
    sa.CheckConstraint(f"status IN ('{APPLIED}', '{REJECTED}')", name="ck_transfers_status"),
    sa.CheckConstraint("amount > 0", name="ck_transfers_amount_positive"),
)


def create_engine(url: str) -> Engine:
    """An engine configured the way exactlyonce's workers configure theirs.

    On SQLite that matters: every writer must take the write lock up front
    (``BEGIN IMMEDIATE``) and wait for it, or concurrent processes fail with
    "database is locked". exactlyonce does not export its engine factory yet,
    hence the private import.
    """
    return _db.create_engine(url)


def create_reader(url: str) -> Engine:
    """An engine for watching progress while the workers write.

    exactlyonce's SQLite engines take the write lock when a transaction
    begins, so a reader built like them queues behind every worker. A plain
    SQLite engine reads the last commit without waiting (the workers put the
    file in WAL mode). Other databases: the same engine as the workers'.
    """
    if sa.engine.make_url(url).get_backend_name() == "sqlite":
        return sa.create_engine(url)
    return _db.create_engine(url)


def account_id(index: int) -> str:
    """The ID of the ``index``-th seeded account: ``acct-0000``, ``acct-0001``, ..."""
    return f"acct-{index:04d}"


def create_schema(engine: Engine) -> None:
    """Create the example's tables (those that are missing)."""
    metadata.create_all(engine)


#: Columns of the example's tables in earlier versions, which drop_schema also
#: recognises as its own (``accounts`` had no ``entries`` before the outbox).
_EARLIER_COLUMNS = {"accounts": {"id", "balance"}}


def drop_schema(engine: Engine) -> None:
    """Drop the example's tables, refusing to touch same-named tables it did not create.

    ``accounts`` and ``transfers`` are common names: a table whose columns are
    not exactly the example's is left alone and reported instead of dropped.
    """
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        found = {column["name"] for column in inspector.get_columns(table.name)}
        if found != set(table.columns.keys()) and found != _EARLIER_COLUMNS.get(table.name):
            raise RuntimeError(
                f"table {table.name!r} exists with columns {sorted(found)}, which are not the "
                "transfer example's; refusing to drop it (use another database)"
            )
    metadata.drop_all(engine)


def seed_accounts(engine: Engine, n: int, balance: int) -> dict[str, int]:
    """Insert ``n`` accounts holding ``balance`` cents each; return ``{id: balance}``."""
    if n < 1 or balance < 0:
        raise ValueError("need at least one account and a non-negative balance")
    initial = {account_id(i): balance for i in range(n)}
    with engine.begin() as connection:
        connection.execute(
            sa.insert(accounts), [{"id": id_, "balance": cents} for id_, cents in initial.items()]
        )
    return initial


def balances(engine: Engine) -> dict[str, int]:
    """Every account's current balance."""
    with engine.connect() as connection:
        return {row.id: row.balance for row in connection.execute(sa.select(accounts))}


def main(argv: Sequence[str] | None = None) -> int:
    """Create the tables if missing and seed the accounts if there are none."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.transfer.models", description=main.__doc__
    )
    parser.add_argument("--accounts", type=int, default=DEFAULT_ACCOUNTS)
    parser.add_argument("--balance", type=int, default=DEFAULT_BALANCE, help="cents per account")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"pass --database-url or set {DATABASE_URL_ENV}")
    engine = create_engine(args.database_url)
    try:
        create_schema(engine)
        with engine.connect() as connection:
            existing = connection.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one()
        if existing:
            print(f"accounts: {existing} already seeded")
        else:
            seed_accounts(engine, args.accounts, args.balance)
            print(f"accounts: seeded {args.accounts} x {args.balance} cents")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
