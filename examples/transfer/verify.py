"""Check that every transfer sent was applied exactly once, and money was conserved.

Given the distinct transfers the producer sent:

- each has exactly one row in ``transfers`` (``applied`` or ``rejected``), with
  the payload that was sent: none lost, none doubled;
- each has exactly one dedup row in ``exactlyonce_processed`` for the
  service's scope, with outcome ``applied``, and no record of the scope was
  dead-lettered or skipped;
- no money was created or destroyed: the balances add up to the initial total;
- each balance equals its initial balance plus the credits minus the debits of
  the applied transfers, recomputed from the ledger; none is negative;
- rejections are consistent: ``unknown-account`` only when an account does
  not exist, and applied transfers only between existing accounts.

It also reports how many duplicate records the service skipped: the records
the broker acknowledged to the producer minus the distinct transfers. (Not the
sum of the topic's end offsets: other producers move those, and the embedded
broker under-reports them.)

::

    python -m examples.transfer.verify --sent sent.json --wait 120
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce.app import DATABASE_URL_ENV
from exactlyonce.schema import Outcome, processed
from examples.transfer.models import (
    APPLIED,
    DEFAULT_BALANCE,
    REJECTED,
    UNKNOWN_ACCOUNT,
    accounts,
    create_engine,
    transfers,
)

#: Problems listed in full; beyond that they are only counted.
MAX_PROBLEMS_SHOWN = 10


@dataclass
class Verification:
    """The outcome of :func:`verify`."""

    ok: bool
    #: The one-line summary to print.
    line: str
    problems: list[str] = field(default_factory=list)
    applied: int = 0
    rejected: int = 0
    lost: int = 0
    doubled: int = 0
    duplicates_skipped: int | None = None


def recorded_count(engine: Engine, transfer_ids: Iterable[str]) -> int:
    """How many of ``transfer_ids`` have a row in ``transfers``."""
    wanted = set(transfer_ids)
    with engine.connect() as connection:
        found = connection.execute(sa.select(transfers.c.transfer_id)).scalars()
        return sum(1 for transfer_id in found if transfer_id in wanted)


def verify(
    engine: Engine,
    sent: Sequence[Mapping[str, Any]],
    *,
    scope: str,
    initial_balances: Mapping[str, int],
    records: int | None = None,
) -> Verification:
    """Verify the database against the distinct transfers ``sent``.

    ``scope`` is the handler's dedup scope (``app.handlers[topic].scope``);
    ``initial_balances`` the seeded ``{account: cents}``; ``records`` the number
    of records produced for ``sent``, re-sends included, if known.
    """
    problems: list[str] = []
    with engine.connect() as connection:
        ledger = connection.execute(sa.select(transfers)).all()
        balances = {row.id: row.balance for row in connection.execute(sa.select(accounts))}
        dedup = connection.execute(
            sa.select(processed.c.message_id, processed.c.outcome).where(processed.c.scope == scope)
        ).all()

    sent_by_id = {transfer["transfer_id"]: transfer for transfer in sent}
    if len(sent_by_id) != len(sent):
        problems.append("the sent list repeats transfer IDs: it must list distinct transfers")
    rows_per_id = Counter(row.transfer_id for row in ledger)
    dedup_per_id = Counter(row.message_id for row in dedup)
    dedup_outcome = {row.message_id: row.outcome for row in dedup}

    lost = [tid for tid in sent_by_id if rows_per_id[tid] == 0]
    doubled = [tid for tid in sent_by_id if rows_per_id[tid] > 1 or dedup_per_id[tid] > 1]
    problems += [f"{tid}: no row in {transfers.name} (lost)" for tid in lost]
    problems += [
        f"{tid}: {rows_per_id[tid]} ledger rows, {dedup_per_id[tid]} dedup rows (doubled)"
        for tid in doubled
    ]
    for tid in sent_by_id:
        if rows_per_id[tid] and dedup_per_id[tid] == 0:
            problems.append(f"{tid}: recorded without a dedup row in scope {scope!r}")
        elif dedup_per_id[tid] and dedup_outcome[tid] != Outcome.APPLIED:
            problems.append(f"{tid}: dedup outcome is {dedup_outcome[tid]!r}, not 'applied'")
    # A record dead-lettered under its coordinates (no usable ID, or a known ID
    # with another payload) is no sent transfer, but it is still a failure here.
    problems += [
        f"record {row.message_id} was {row.outcome} in scope {scope!r}"
        for row in dedup
        if row.message_id not in sent_by_id and row.outcome != Outcome.APPLIED
    ]

    # Every ledger row must match what was sent, and its outcome must be possible.
    applied = rejected = 0
    expected = dict(initial_balances)
    for row in ledger:
        if row.transfer_id in sent_by_id:
            transfer = sent_by_id[row.transfer_id]
            if (row.from_account, row.to_account, row.amount) != (
                transfer["from"], transfer["to"], transfer["amount"]
            ):
                problems.append(f"{row.transfer_id}: recorded payload differs from the one sent")
            if row.status == APPLIED:
                applied += 1
            elif row.status == REJECTED:
                rejected += 1
        known = row.from_account in initial_balances and row.to_account in initial_balances
        if row.status == APPLIED:
            if not known:
                problems.append(f"{row.transfer_id}: applied with an unknown account")
                continue
            expected[row.from_account] -= row.amount
            expected[row.to_account] += row.amount
        elif row.reason == UNKNOWN_ACCOUNT and known:
            problems.append(f"{row.transfer_id}: rejected as unknown-account, but both exist")

    # Money: conserved in total, and right account by account.
    initial_total = sum(initial_balances.values())
    total = sum(balances.values())
    if total != initial_total:
        problems.append(f"money not conserved: balances add up to {total}, not {initial_total}")
    if set(balances) != set(initial_balances):
        problems.append("the accounts are not the seeded ones")
    for account, balance in sorted(balances.items()):
        if account in expected and balance != expected[account]:
            problems.append(f"{account}: balance {balance}, but the ledger gives {expected[account]}")
        if balance < 0:
            problems.append(f"{account}: negative balance {balance}")

    duplicates = None if records is None else records - len(sent_by_id)
    if duplicates is not None and duplicates < 0:
        problems.append(f"only {records} records for {len(sent_by_id)} distinct transfers")

    result = Verification(
        ok=not problems,
        line="",
        problems=problems,
        applied=applied,
        rejected=rejected,
        lost=len(lost),
        doubled=len(doubled),
        duplicates_skipped=duplicates,
    )
    skipped = "" if duplicates is None else f"{duplicates} duplicates skipped, "
    conserved = "money conserved" if total == initial_total else "MONEY NOT CONSERVED"
    summary = (
        f"{len(sent_by_id)} transfers applied once ({applied} applied, {rejected} rejected), "
        f"{skipped}{len(lost)} lost, {len(doubled)} doubled, {conserved} ({total} = {initial_total})"
    )
    if problems:
        summary = summary.replace(" applied once (", " (", 1).replace(
            f"({total} = {initial_total})", f"({total} vs {initial_total})"
        )
        result.line = f"NOT verified: {summary}; {len(problems)} problems"
    else:
        result.line = f"verified: {summary}"
    return result


def report(result: Verification, out: Any = None) -> None:
    """Print the problems (at most :data:`MAX_PROBLEMS_SHOWN`), then the line."""
    out = out or sys.stdout
    for problem in result.problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  problem: {problem}", file=out)
    if len(result.problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(result.problems) - MAX_PROBLEMS_SHOWN} more", file=out)
    print(result.line, file=out, flush=True)


def wait_until_recorded(engine: Engine, transfer_ids: Sequence[str], timeout_s: float) -> int:
    """Poll until every transfer has a ledger row or ``timeout_s`` passes; return the count."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = recorded_count(engine, transfer_ids)
        if done >= len(set(transfer_ids)) or time.monotonic() >= deadline:
            return done
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Verify the transfers of a producer's ``--out`` file; exit 0 only if verified."""
    from examples.transfer.producer import SendReport
    from examples.transfer.service import app

    parser = argparse.ArgumentParser(prog="python -m examples.transfer.verify", description=main.__doc__)
    parser.add_argument("--sent", required=True, help="the producer's --out file")
    parser.add_argument("--initial-balance", type=int, default=DEFAULT_BALANCE,
                        help="cents each account was seeded with")
    parser.add_argument("--wait", type=float, default=0,
                        help="seconds to wait for every transfer to be recorded first")
    parser.add_argument("--scope", default=None,
                        help="dedup scope (default: the service's, from its environment)")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"pass --database-url or set {DATABASE_URL_ENV}")

    sent = SendReport.load(args.sent)
    if args.scope:
        scope = args.scope
    elif sent.topic in app.handlers:
        scope = app.handlers[sent.topic].scope
    else:
        parser.error(f"the service does not consume {sent.topic!r}: pass --scope")
    engine = create_engine(args.database_url)
    try:
        ids = [transfer["transfer_id"] for transfer in sent.transfers]
        if args.wait:
            wait_until_recorded(engine, ids, args.wait)
        with engine.connect() as connection:
            initial = {
                account: args.initial_balance
                for account in connection.execute(sa.select(accounts.c.id)).scalars()
            }
        result = verify(engine, sent.transfers, scope=scope, initial_balances=initial,
                        records=sent.records)
    finally:
        engine.dispose()
    report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
