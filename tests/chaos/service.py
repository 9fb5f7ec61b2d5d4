"""The chaos suite's transfer worker: the example transfer handler plus a journal and poison.

``exactlyonce run tests.chaos.service:app`` — settings come from the
environment (see :mod:`tests.chaos.bank`). The journal row is written in the
handler's transaction with no unique constraint, so a transfer applied twice
shows up as two journal rows even though the example's own ``transfers``
table has the transfer ID as its primary key.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
from exactlyonce.retry import Retry
from examples.transfer.service import apply_transfer
from tests.chaos.bank import MAX_VALUE_BYTES, journal

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


@app.handler(
    TOPIC,
    message_id=exactlyonce.ids.json_field("transfer_id"),
    retry=Retry(attempts=3, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50)),
    max_value_bytes=MAX_VALUE_BYTES,
)
def apply(message: exactlyonce.Message, session: Session) -> None:
    """Apply the transfer like the example service, and journal it."""
    payload = message.json()
    if isinstance(payload, dict) and payload.get("poison"):
        raise RuntimeError(f"poison transfer {payload.get('transfer_id')}")
    apply_transfer(message, session)
    session.execute(sa.insert(journal).values(transfer_id=payload["transfer_id"], worker_pid=os.getpid()))
