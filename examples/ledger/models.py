"""The ledger service's table: one statement line per account entry.

On its own ``MetaData``: the ledger is another service, which here happens to
share the transfer service's database (a real one would have its own, fed
only through Kafka). Money is an integer number of cents.

``python -m examples.ledger.models`` creates the table if it is missing (the
docker-compose ``migrate`` service runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce.app import DATABASE_URL_ENV
from examples.transfer.models import ACCOUNT_ID_LENGTH, CREDIT, DEBIT, TRANSFER_ID_LENGTH, create_engine

metadata = sa.MetaData()

#: ``(account, line)`` is the primary key: line N of an account can be written
#: once. Lines are numbered 1, 2, ... per account, in the order the transfer
#: service applied the account's entries (``seq`` of the event).
statement_lines = sa.Table(
    "statement_lines",
    metadata,
    sa.Column("account", sa.String(ACCOUNT_ID_LENGTH), primary_key=True),
    sa.Column("line", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("transfer_id", sa.String(TRANSFER_ID_LENGTH), nullable=False),
    sa.Column("direction", sa.String(6), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("counterparty", sa.String(ACCOUNT_ID_LENGTH), nullable=False),
    sa.CheckConstraint(f"direction IN ('{DEBIT}', '{CREDIT}')", name="ck_statement_lines_direction"),
    sa.CheckConstraint("line > 0", name="ck_statement_lines_line_positive"),
)


def create_schema(engine: Engine) -> None:
    """Create the ledger's table if it is missing."""
    metadata.create_all(engine)


def drop_schema(engine: Engine) -> None:
    """Drop the ledger's table, refusing to touch a same-named table it did not create."""
    inspector = sa.inspect(engine)
    if inspector.has_table(statement_lines.name):
        found = {column["name"] for column in inspector.get_columns(statement_lines.name)}
        if found != set(statement_lines.columns.keys()):
            raise RuntimeError(
                f"table {statement_lines.name!r} exists with columns {sorted(found)}, which are not "
                "the ledger example's; refusing to drop it (use another database)"
            )
    metadata.drop_all(engine)


def main(argv: Sequence[str] | None = None) -> int:
    """Create the ledger's table if it is missing."""
    parser = argparse.ArgumentParser(prog="python -m examples.ledger.models", description=main.__doc__)
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"pass --database-url or set {DATABASE_URL_ENV}")
    engine = create_engine(args.database_url)
    try:
        create_schema(engine)
    finally:
        engine.dispose()
    print(f"{statement_lines.name}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
