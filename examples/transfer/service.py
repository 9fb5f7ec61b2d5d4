"""The transfer service: applies each money transfer from Kafka exactly once.

Run it with::

    exactlyonce run examples.transfer.service:app

Each record of the ``transfers`` topic is a JSON object
``{"transfer_id": "...", "from": "acct-0001", "to": "acct-0042", "amount": 250}``
(amount in cents). Its ``transfer_id``, chosen by the sender, is the message
ID: a transfer that is re-sent, on any partition, or redelivered after a crash
is recognised and skipped, because exactlyonce claims the ID in the same
database transaction as the balance updates below.

Outcomes:

- money moves: the transfer is recorded ``applied``, and two events, one per
  account (its debit and its credit), are published to ``transfer-applied``
  through exactlyonce's transactional outbox (see :func:`apply_transfer`);
- an unknown account, or too little money: the transfer is recorded
  ``rejected`` with a reason. That is a business outcome, not an error: it is
  committed and never retried;
- a malformed payload raises :class:`InvalidTransfer` (a
  :class:`exactlyonce.MessageError`), so the record goes to ``transfers.dlq``.

Settings (environment):

- ``EXACTLYONCE_BOOTSTRAP_SERVERS``, ``EXACTLYONCE_DATABASE_URL``: read by exactlyonce;
- ``EXACTLYONCE_TRANSFER_APPLIED_TOPIC``: where the events go (default
  ``transfer-applied``; the ledger service reads the same variable);
- ``EXACTLYONCE_TRANSFER_RELAY``: ``0`` when a standalone ``exactlyonce relay``
  sends the outbox; by default each worker runs a relay thread (several relays
  at once are safe: they take different rows and keep each key's order);
- ``EXACTLYONCE_TRANSFER_TOPIC`` (default ``transfers``) and
  ``EXACTLYONCE_TRANSFER_GROUP`` (default ``transfer-service``). The dedup
  scope is derived from both (``<group>:<topic>``): use ``app.handlers[TOPIC].scope``;
- ``EXACTLYONCE_TRANSFER_CONSUMER_CONFIG``: a JSON object passed as
  ``consumer_config``, e.g. ``{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}``
  to notice a dead worker sooner (default: exactlyonce's settings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
from examples.settings import consumer_config_from_env
from examples.transfer.models import (
    ACCOUNT_ID_LENGTH,
    APPLIED,
    CREDIT,
    DEBIT,
    INSUFFICIENT_FUNDS,
    MAX_TRANSFER_ID,
    REJECTED,
    UNKNOWN_ACCOUNT,
    accounts,
    transfers,
)

TOPIC_ENV = "EXACTLYONCE_TRANSFER_TOPIC"
GROUP_ENV = "EXACTLYONCE_TRANSFER_GROUP"
CONSUMER_CONFIG_ENV = "EXACTLYONCE_TRANSFER_CONSUMER_CONFIG"
APPLIED_TOPIC_ENV = "EXACTLYONCE_TRANSFER_APPLIED_TOPIC"
RELAY_ENV = "EXACTLYONCE_TRANSFER_RELAY"

TOPIC = os.environ.get(TOPIC_ENV) or "transfers"
APPLIED_TOPIC = os.environ.get(APPLIED_TOPIC_ENV) or "transfer-applied"
GROUP = os.environ.get(GROUP_ENV) or "transfer-service"

#: Larger amounts are refused as malformed: they are no real transfer and
#: would overflow the BIGINT balance column.
MAX_AMOUNT = 10**15


# App.run() relays the outbox in a background thread, unless RELAY_ENV is "0"
# because a standalone `exactlyonce relay` does it (as in docker-compose.yml).
app = exactlyonce.App(group_id=GROUP, consumer_config=consumer_config_from_env(CONSUMER_CONFIG_ENV),
                      outbox=os.environ.get(RELAY_ENV, "1") != "0")


class InvalidTransfer(exactlyonce.MessageError):
    """The record is not a well-formed transfer: it is dead-lettered, never retried."""

    reason = "invalid-transfer"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A decoded transfer request."""

    transfer_id: str
    from_account: str
    to_account: str
    amount: int


def parse_transfer(message: exactlyonce.Message) -> Transfer:
    """Decode and validate the record's JSON value, or raise :class:`InvalidTransfer`."""
    payload = message.json()  # raises MessageDecodeError (a MessageError) if not JSON
    if not isinstance(payload, dict):
        raise InvalidTransfer(f"{message.where()}: expected a JSON object")
    transfer_id = payload.get("transfer_id")
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_TRANSFER_ID:
        raise InvalidTransfer(f"{message.where()}: transfer_id must be a string of 1 to {MAX_TRANSFER_ID} "
                              "characters")
    for field in ("from", "to"):
        value = payload.get(field)
        if not isinstance(value, str) or not 0 < len(value) <= ACCOUNT_ID_LENGTH:
            raise InvalidTransfer(
                f"{message.where()}: {field!r} must be an account ID of 1 to "
                f"{ACCOUNT_ID_LENGTH} characters"
            )
    if payload["from"] == payload["to"]:
        raise InvalidTransfer(f"{message.where()}: 'from' and 'to' are the same account")
    amount = payload.get("amount")
    # bool is an int in Python: refuse true/false explicitly.
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT:
        raise InvalidTransfer(
            f"{message.where()}: amount must be an integer number of cents, 1 to {MAX_AMOUNT}"
        )
    return Transfer(transfer_id, payload["from"], payload["to"], amount)


@dataclass(frozen=True, slots=True)
class Entry:
    """One side of an applied transfer: a line of one account's statement.

    ``seq`` is the account's entry number (1, 2, ...), taken from
    ``accounts.entries`` under the row lock, so an account's entries are
    numbered in the order their transfers were applied. It is what lets the
    ledger service put the events back in order, whatever order Kafka and the
    outbox relay deliver them in.
    """

    account: str
    seq: int
    transfer_id: str
    direction: str  # DEBIT or CREDIT
    amount: int
    balance_after: int
    counterparty: str

    @property
    def message_id(self) -> str:
        """Stable, so a re-send of the event is recognisable: ``<transfer_id>:debit``."""
        return f"{self.transfer_id}:{self.direction}"

    def event(self) -> dict[str, Any]:
        """The ``transfer-applied`` record's JSON value."""
        return {
            "account": self.account,
            "seq": self.seq,
            "transfer_id": self.transfer_id,
            "direction": self.direction,
            "amount": self.amount,
            "balance_after": self.balance_after,
            "counterparty": self.counterparty,
        }


def record_transfer(session: Session, transfer: Transfer) -> tuple[str, list[Entry]]:
    """Move the money and record the transfer in ``session``'s transaction.

    Returns the recorded status (``applied`` or ``rejected``) and the two
    statement entries of an applied transfer (none for a rejected one).
    """
    # Lock both rows before deciding, in one statement and in ID order, so two
    # workers moving money between the same accounts in opposite directions
    # queue instead of deadlocking. SQLite has no row locks (FOR UPDATE is
    # left out there): exactlyonce's BEGIN IMMEDIATE locks the whole database.
    rows = session.execute(
        sa.select(accounts.c.id, accounts.c.balance, accounts.c.entries)
        .where(accounts.c.id.in_([transfer.from_account, transfer.to_account]))
        .order_by(accounts.c.id)
        .with_for_update()
    ).all()
    locked = {row.id: row for row in rows}

    # Decide on the values read under the lock, never on an UPDATE's rowcount
    # (some drivers report -1).
    reason: str | None = None
    entries: list[Entry] = []
    if transfer.from_account not in locked or transfer.to_account not in locked:
        reason = UNKNOWN_ACCOUNT
    elif locked[transfer.from_account].balance < transfer.amount:
        reason = INSUFFICIENT_FUNDS
    else:
        sides = [
            (transfer.from_account, DEBIT, -transfer.amount, transfer.to_account),
            (transfer.to_account, CREDIT, transfer.amount, transfer.from_account),
        ]
        for account, direction, change, counterparty in sides:
            row = locked[account]
            session.execute(
                sa.update(accounts)
                .where(accounts.c.id == account)
                .values(balance=accounts.c.balance + change, entries=accounts.c.entries + 1)
            )
            entries.append(Entry(account, row.entries + 1, transfer.transfer_id, direction,
                                 transfer.amount, row.balance + change, counterparty))

    status = APPLIED if reason is None else REJECTED
    session.execute(
        sa.insert(transfers).values(
            transfer_id=transfer.transfer_id,
            from_account=transfer.from_account,
            to_account=transfer.to_account,
            amount=transfer.amount,
            status=status,
            reason=reason,
        )
    )
    return status, entries


@app.handler(TOPIC, message_id=exactlyonce.ids.json_field("transfer_id"))
def apply_transfer(message: exactlyonce.Message, session: Session) -> str:
    """Apply the transfer and publish its statement entries, in exactlyonce's transaction.

    The entries go through the transactional outbox: they are stored in the
    same transaction as the balances and the dedup row, so they are published
    if and only if the transfer was applied, once per transfer however often
    the record is redelivered. Keyed by account, so an account's entries share
    a partition. Returns the recorded status (``applied`` or ``rejected``).
    """
    status, entries = record_transfer(session, parse_transfer(message))
    for entry in entries:
        exactlyonce.publish(session, APPLIED_TOPIC, entry.event(), key=entry.account,
                            message_id=entry.message_id)
    return status
