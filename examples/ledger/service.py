"""The ledger service: every account's statement, one line per entry, in order, exactly once.

Run it with::

    exactlyonce run examples.ledger.service:app

The transfer service publishes two events per applied transfer to
``transfer-applied`` (see :class:`examples.transfer.service.Entry`), one per
account side, each numbered with the account's entry counter::

    {"account": "acct-0007", "seq": 12, "transfer_id": "t-...", "direction": "debit",
     "amount": 250, "balance_after": 9750, "counterparty": "acct-0042"}

This service turns them into statement lines: line ``seq`` of ``account``.

Why ``sequence=``: usually an account's events arrive in order (they share a
key, so a partition, and the outbox relay keeps each key's order), but not
always. A relay killed after sending re-sends its batch (duplicates); a
consumer killed before committing gets its records redelivered to another
worker; a topic repartitioned, or another publisher, can put one account's
events on several partitions, read by several workers at their own pace. With
``sequence=`` exactlyonce keeps one watermark per account in the database and,
in the handler's transaction:

- skips an event numbered at or below the watermark (a duplicate);
- hands the next number to the handler and moves the watermark;
- parks an event that comes early in the database, and hands it over once the
  events before it have been handled.

So :func:`add_statement_line` sees each account's events strictly as 1, 2,
3, ..., each once, and can simply check that: a statement with a gap or a line
twice is impossible by construction, not by luck.

Settings (environment): ``EXACTLYONCE_BOOTSTRAP_SERVERS``,
``EXACTLYONCE_DATABASE_URL``; ``EXACTLYONCE_TRANSFER_APPLIED_TOPIC`` (default
``transfer-applied``, as the transfer service), ``EXACTLYONCE_LEDGER_GROUP``
(default ``ledger-service``), ``EXACTLYONCE_LEDGER_CONSUMER_CONFIG`` (a JSON
object for ``consumer_config``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
from examples.ledger.models import statement_lines
from examples.settings import consumer_config_from_env
from examples.transfer.models import CREDIT, DEBIT

TOPIC_ENV = "EXACTLYONCE_TRANSFER_APPLIED_TOPIC"
GROUP_ENV = "EXACTLYONCE_LEDGER_GROUP"
CONSUMER_CONFIG_ENV = "EXACTLYONCE_LEDGER_CONSUMER_CONFIG"

TOPIC = os.environ.get(TOPIC_ENV) or "transfer-applied"
GROUP = os.environ.get(GROUP_ENV) or "ledger-service"

# outbox=False: the ledger publishes nothing, so it runs no outbox relay.
app = exactlyonce.App(group_id=GROUP, consumer_config=consumer_config_from_env(CONSUMER_CONFIG_ENV),
                      outbox=False)


class InvalidEvent(exactlyonce.MessageError):
    """The record is not a well-formed ``transfer-applied`` event: it is dead-lettered."""

    reason = "invalid-event"


class OutOfOrder(Exception):
    """An event is not the account's next line. ``sequence=`` makes this impossible.

    Checked anyway, because a statement is worth an assertion: were it ever
    raised, the event would be retried and then dead-lettered, never written.
    """


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded ``transfer-applied`` event: one side of an applied transfer."""

    account: str
    seq: int
    transfer_id: str
    direction: str
    amount: int
    balance_after: int
    counterparty: str


def parse_event(message: exactlyonce.Message) -> Event:
    """Decode and check the record's JSON value, or raise :class:`InvalidEvent`."""
    payload = message.json()  # raises MessageDecodeError (a MessageError) if not JSON
    if not isinstance(payload, dict):
        raise InvalidEvent(f"{message.where()}: expected a JSON object")
    for name in ("account", "transfer_id", "counterparty"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise InvalidEvent(f"{message.where()}: {name!r} must be a non-empty string")
    for name, least in (("seq", 1), ("amount", 1), ("balance_after", 0)):
        value = payload.get(name)
        # bool is an int in Python: refuse true/false explicitly.
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidEvent(f"{message.where()}: {name!r} must be an integer of at least {least}")
    if payload.get("direction") not in (DEBIT, CREDIT):
        raise InvalidEvent(f"{message.where()}: 'direction' must be {DEBIT!r} or {CREDIT!r}")
    return Event(payload["account"], payload["seq"], payload["transfer_id"], payload["direction"],
                 payload["amount"], payload["balance_after"], payload["counterparty"])


def account_and_seq(message: exactlyonce.Message) -> tuple[str, int]:
    """The event's stream and number for ``sequence=``: one stream per account."""
    event = parse_event(message)
    return event.account, event.seq


@app.handler(TOPIC, sequence=account_and_seq)
def add_statement_line(message: exactlyonce.Message, session: Session) -> None:
    """Write the event as the account's next statement line, in exactlyonce's transaction."""
    event = parse_event(message)
    last = session.execute(
        sa.select(sa.func.max(statement_lines.c.line)).where(statement_lines.c.account == event.account)
    ).scalar_one()
    if event.seq != (last or 0) + 1:
        raise OutOfOrder(f"{event.account}: event {event.seq} arrived after line {last or 0}")
    session.execute(
        sa.insert(statement_lines).values(
            account=event.account,
            line=event.seq,
            transfer_id=event.transfer_id,
            direction=event.direction,
            amount=event.amount,
            balance_after=event.balance_after,
            counterparty=event.counterparty,
        )
    )
