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

- money moves: the transfer is recorded ``applied``;
- an unknown account, or too little money: the transfer is recorded
  ``rejected`` with a reason. That is a business outcome, not an error: it is
  committed and never retried;
- a malformed payload raises :class:`InvalidTransfer` (a
  :class:`exactlyonce.MessageError`), so the record goes to ``transfers.dlq``.

Settings (environment):

- ``EXACTLYONCE_BOOTSTRAP_SERVERS``, ``EXACTLYONCE_DATABASE_URL``: read by exactlyonce;
- ``EXACTLYONCE_TRANSFER_TOPIC`` (default ``transfers``) and
  ``EXACTLYONCE_TRANSFER_GROUP`` (default ``transfer-service``). The dedup
  scope is derived from both (``<group>:<topic>``): use ``app.handlers[TOPIC].scope``;
- ``EXACTLYONCE_TRANSFER_CONSUMER_CONFIG``: a JSON object passed as
  ``consumer_config``, e.g. ``{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}``
  to notice a dead worker sooner (default: exactlyonce's settings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
from examples.transfer.models import (
    ACCOUNT_ID_LENGTH,
    APPLIED,
    INSUFFICIENT_FUNDS,
    REJECTED,
    TRANSFER_ID_LENGTH,
    UNKNOWN_ACCOUNT,
    accounts,
    transfers,
)

TOPIC_ENV = "EXACTLYONCE_TRANSFER_TOPIC"
GROUP_ENV = "EXACTLYONCE_TRANSFER_GROUP"
CONSUMER_CONFIG_ENV = "EXACTLYONCE_TRANSFER_CONSUMER_CONFIG"

TOPIC = os.environ.get(TOPIC_ENV) or "transfers"
GROUP = os.environ.get(GROUP_ENV) or "transfer-service"

#: Larger amounts are refused as malformed: they are no real transfer and
#: would overflow the BIGINT balance column.
MAX_AMOUNT = 10**15


def _consumer_config() -> dict[str, Any]:
    raw = os.environ.get(CONSUMER_CONFIG_ENV, "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise exactlyonce.ConfigurationError(f"{CONSUMER_CONFIG_ENV} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise exactlyonce.ConfigurationError(f"{CONSUMER_CONFIG_ENV} must be a JSON object")
    return config


app = exactlyonce.App(group_id=GROUP, consumer_config=_consumer_config())


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
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= TRANSFER_ID_LENGTH:
        raise InvalidTransfer(f"{message.where()}: transfer_id must be a non-empty string")
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


@app.handler(TOPIC, message_id=exactlyonce.ids.json_field("transfer_id"))
def apply_transfer(message: exactlyonce.Message, session: Session) -> str:
    """Move the money and record the transfer, in exactlyonce's transaction.

    Returns the recorded status (``applied`` or ``rejected``).
    """
    transfer = parse_transfer(message)
    # Lock both rows before deciding, in one statement and in ID order, so two
    # workers moving money between the same accounts in opposite directions
    # queue instead of deadlocking. SQLite has no row locks (FOR UPDATE is
    # left out there): exactlyonce's BEGIN IMMEDIATE locks the whole database.
    rows = session.execute(
        sa.select(accounts.c.id, accounts.c.balance)
        .where(accounts.c.id.in_([transfer.from_account, transfer.to_account]))
        .order_by(accounts.c.id)
        .with_for_update()
    ).all()
    balance = {row.id: row.balance for row in rows}

    # Decide on the values read under the lock, never on an UPDATE's rowcount
    # (some drivers report -1).
    reason: str | None = None
    if transfer.from_account not in balance or transfer.to_account not in balance:
        reason = UNKNOWN_ACCOUNT
    elif balance[transfer.from_account] < transfer.amount:
        reason = INSUFFICIENT_FUNDS
    else:
        session.execute(
            sa.update(accounts)
            .where(accounts.c.id == transfer.from_account)
            .values(balance=accounts.c.balance - transfer.amount)
        )
        session.execute(
            sa.update(accounts)
            .where(accounts.c.id == transfer.to_account)
            .values(balance=accounts.c.balance + transfer.amount)
        )

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
    return status
