"""The chaos suite's transfer worker: the example transfer handler plus a journal and poison.

``exactlyonce run tests.chaos.service:app`` — settings come from the
environment (see :mod:`tests.chaos.bank`). The journal row is written in the
handler's transaction with no unique constraint, so a transfer applied twice
shows up as two journal rows even though the example's own ``transfers``
table has the transfer ID as its primary key.

With ``CHAOS_ASYNC_HANDLER=1`` the handler is an ``async def`` one doing the
same work through its ``AsyncSession``: the example's sync transfer logic
through ``session.run_sync`` (its writes and outbox rows in the claim's
transaction), the journal row with ``await session.execute``.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import exactlyonce
from exactlyonce.retry import Retry
from examples.transfer.service import apply_transfer
from tests.chaos.bank import ASYNC_HANDLER_ENV, MAX_VALUE_BYTES, journal

TOPIC = os.environ["CHAOS_TOPIC"]

app = exactlyonce.App(
    group_id=os.environ.get("CHAOS_GROUP", "chaos-bank"),
    consumer_config=json.loads(os.environ.get("CHAOS_CONSUMER_CONFIG", "{}")),
    transient_retry_budget=timedelta(seconds=30),
    # The example handler stores two statement entries per applied transfer in
    # the outbox (to $EXACTLYONCE_TRANSFER_APPLIED_TOPIC); standalone
    # `exactlyonce relay` processes, killed and stopped like the workers, send
    # them, so no relay thread runs here.
    outbox=False,
)


register = app.handler(
    TOPIC,
    message_id=exactlyonce.ids.json_field("transfer_id"),
    retry=Retry(attempts=3, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50)),
    max_value_bytes=MAX_VALUE_BYTES,
)


def _payload(message: exactlyonce.Message) -> Any:
    payload = message.json()
    if isinstance(payload, dict) and payload.get("poison"):
        raise RuntimeError(f"poison transfer {payload.get('transfer_id')}")
    return payload


def apply(message: exactlyonce.Message, session: Session) -> None:
    """Apply the transfer like the example service, and journal it."""
    payload = _payload(message)
    apply_transfer(message, session)
    session.execute(sa.insert(journal).values(transfer_id=payload["transfer_id"], worker_pid=os.getpid()))


async def apply_async(message: exactlyonce.Message, session: AsyncSession) -> None:
    """:func:`apply` as an async def handler, on the worker's event loop."""
    payload = _payload(message)
    await asyncio.sleep(0)  # the loop runs, inside the transaction
    await session.run_sync(lambda sync_session: apply_transfer(message, sync_session))
    await session.execute(sa.insert(journal).values(transfer_id=payload["transfer_id"], worker_pid=os.getpid()))


register(apply_async if os.environ.get(ASYNC_HANDLER_ENV) == "1" else apply)
