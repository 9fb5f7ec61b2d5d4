"""Check the ledger's statements against the transfer service's database.

Given the seeded balances, the statements are right when:

- every applied transfer has exactly one debit line (on its ``from`` account)
  and one credit line (on its ``to`` account), with its amount and
  counterparty; no other transfer has a line;
- each account's lines are numbered 1..N without gaps or repeats, N being the
  account's ``entries`` in the transfer service;
- in that order, the lines replay the account's history: starting from the
  seeded balance, each line's ``balance_after`` is the one before plus the
  credit or minus the debit, and the last one is the account's final balance;
- exactlyonce's own state agrees (with ``scope``): each account's sequence
  watermark is N, no event is still parked and none was dead-lettered.

::

    python -m examples.ledger.verify --initial-balance 10000 --wait 120
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce.app import DATABASE_URL_ENV
from exactlyonce.schema import Outcome, outbox, parked, processed, sequence_streams
from examples.ledger.models import statement_lines
from examples.transfer.models import APPLIED, CREDIT, DEBIT, DEFAULT_BALANCE, accounts, create_engine, transfers

#: Problems listed in full; beyond that they are only counted.
MAX_PROBLEMS_SHOWN = 10


@dataclass
class LedgerVerification:
    """The outcome of :func:`verify_ledger`."""

    ok: bool
    #: The one-line summary to print.
    line: str
    problems: list[str] = field(default_factory=list)
    lines: int = 0
    #: Transfer sides (debit or credit) with no line, or with more than one.
    missing: int = 0
    doubled: int = 0
    #: Accounts whose lines are not numbered 1..N, or do not replay to the final balance.
    misnumbered: int = 0
    balances_off: int = 0


def line_count(engine: Engine) -> int:
    """How many statement lines the ledger holds."""
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(statement_lines)).scalar_one()


def applied_count(engine: Engine) -> int:
    """How many transfers the transfer service applied (each should give two lines)."""
    with engine.connect() as connection:
        return connection.execute(
            sa.select(sa.func.count()).select_from(transfers).where(transfers.c.status == APPLIED)
        ).scalar_one()


def wait_until_complete(engine: Engine, timeout_s: float) -> bool:
    """Poll until the outbox is empty and every applied transfer has its two lines, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as connection:
            pending = connection.execute(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            ).scalar_one()
        if pending == 0 and line_count(engine) >= 2 * applied_count(engine):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def verify_ledger(
    engine: Engine, *, initial_balances: Mapping[str, int], scope: str | None = None
) -> LedgerVerification:
    """Verify the statements; ``scope`` is the ledger handler's (``app.handlers[TOPIC].scope``)."""
    problems: list[str] = []
    watermarks: dict[str, int] = {}
    still_parked = dead = 0
    with engine.connect() as connection:
        ledger = connection.execute(sa.select(transfers)).all()
        account_rows = {row.id: row for row in connection.execute(sa.select(accounts))}
        lines = connection.execute(
            sa.select(statement_lines).order_by(statement_lines.c.account, statement_lines.c.line)
        ).all()
        if scope is not None:
            watermarks = dict(connection.execute(
                sa.select(sequence_streams.c.stream, sequence_streams.c.watermark)
                .where(sequence_streams.c.scope == scope)
            ).all())
            still_parked = connection.execute(
                sa.select(sa.func.count()).select_from(parked).where(parked.c.scope == scope)
            ).scalar_one()
            dead = connection.execute(
                sa.select(sa.func.count()).select_from(processed)
                .where(processed.c.scope == scope, processed.c.outcome == Outcome.DEAD_LETTERED)
            ).scalar_one()

    # One debit and one credit line per applied transfer, none for the others.
    sides: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for line in lines:
        sides[(line.transfer_id, line.direction)].append(line)
    missing = doubled = 0
    applied_ids = set()
    for transfer in ledger:
        if transfer.status != APPLIED:
            continue
        applied_ids.add(transfer.transfer_id)
        for direction, account, counterparty in ((DEBIT, transfer.from_account, transfer.to_account),
                                                 (CREDIT, transfer.to_account, transfer.from_account)):
            found = sides.get((transfer.transfer_id, direction), [])
            if not found:
                missing += 1
                problems.append(f"{transfer.transfer_id}: no {direction} line")
            elif len(found) > 1:
                doubled += 1
                problems.append(f"{transfer.transfer_id}: {len(found)} {direction} lines")
            elif (found[0].account, found[0].amount, found[0].counterparty) != (
                account, transfer.amount, counterparty
            ):
                problems.append(f"{transfer.transfer_id}: the {direction} line does not match the transfer")
    problems += [
        f"{transfer_id}: a {direction} line, but the transfer was not applied"
        for transfer_id, direction in sides
        if transfer_id not in applied_ids
    ]

    # Each account's lines: 1..N in order, replaying its history to its final balance.
    by_account: dict[str, list[Any]] = defaultdict(list)
    for line in lines:
        by_account[line.account].append(line)
    misnumbered = balances_off = 0
    for account_id, row in sorted(account_rows.items()):
        history = by_account.pop(account_id, [])
        numbers = [line.line for line in history]
        if numbers != list(range(1, row.entries + 1)):
            misnumbered += 1
            problems.append(f"{account_id}: lines {_ranges(numbers)}, expected 1..{row.entries}")
        balance = initial_balances.get(account_id)
        if balance is None:
            problems.append(f"{account_id}: not a seeded account")
            continue
        for line in history:
            balance += line.amount if line.direction == CREDIT else -line.amount
            if line.balance_after != balance:
                problems.append(f"{account_id}: line {line.line} says {line.balance_after}, "
                                f"the lines before it give {balance}")
                break
        if balance != row.balance:
            balances_off += 1
            problems.append(f"{account_id}: the statement ends at {balance}, the balance is {row.balance}")
        if scope is not None and watermarks.get(account_id, 0) != row.entries:
            problems.append(f"{account_id}: sequence watermark {watermarks.get(account_id, 0)}, "
                            f"but {row.entries} entries")
    problems += [f"{account}: lines, but no such account" for account in sorted(by_account)]
    if scope is not None:
        if still_parked:
            problems.append(f"{still_parked} events still parked in scope {scope!r}")
        if dead:
            problems.append(f"{dead} events dead-lettered in scope {scope!r}")

    result = LedgerVerification(ok=not problems, line="", problems=problems, lines=len(lines),
                                missing=missing, doubled=doubled, misnumbered=misnumbered,
                                balances_off=balances_off)
    with_lines = sum(1 for row in account_rows.values() if row.entries)
    summary = (
        f"{len(lines)} statement lines for {len(applied_ids)} applied transfers, "
        f"{missing} missing, {doubled} doubled; {with_lines} accounts numbered 1..N "
        f"({misnumbered} with gaps or repeats), running balances = final balances "
        f"({balances_off} off)"
    )
    result.line = f"ledger {'verified' if result.ok else 'NOT verified'}: {summary}"
    if problems:
        result.line += f"; {len(problems)} problems"
    return result


def _ranges(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 5, 5]`` as ``1..3, 5, 5``: a short picture of a broken numbering."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    parts = [f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs]
    return ", ".join(parts[:5]) + (", ..." if len(parts) > 5 else "") if parts else "none"


def report(result: LedgerVerification, out: Any = None) -> None:
    """Print the problems (at most :data:`MAX_PROBLEMS_SHOWN`), then the line."""
    out = out or sys.stdout
    for problem in result.problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  problem: {problem}", file=out)
    if len(result.problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(result.problems) - MAX_PROBLEMS_SHOWN} more", file=out)
    print(result.line, file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Verify the ledger's statements; exit 0 only if verified."""
    from examples.ledger.service import TOPIC, app

    parser = argparse.ArgumentParser(prog="python -m examples.ledger.verify", description=main.__doc__)
    parser.add_argument("--initial-balance", type=int, default=DEFAULT_BALANCE,
                        help="cents each account was seeded with")
    parser.add_argument("--wait", type=float, default=0,
                        help="seconds to wait first for the outbox to empty and every line to arrive")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"pass --database-url or set {DATABASE_URL_ENV}")
    engine = create_engine(args.database_url)
    try:
        if args.wait:
            wait_until_complete(engine, args.wait)
        with engine.connect() as connection:
            initial = {account: args.initial_balance
                       for account in connection.execute(sa.select(accounts.c.id)).scalars()}
        result = verify_ledger(engine, initial_balances=initial, scope=app.handlers[TOPIC].scope)
    finally:
        engine.dispose()
    report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
