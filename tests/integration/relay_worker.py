"""An outbox relay process that dies by SIGKILL after sending, before marking sent.

``python -m tests.integration.relay_worker --database-url ... --bootstrap ...
--batch-size N --crash-at-batch K``

It runs :class:`exactlyonce.outbox.Relay` and SIGKILLs itself when the relay is
about to mark its K-th batch sent: the batch's records are acknowledged by the
broker, and the rows are still pending.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from sqlalchemy import event

from exactlyonce import _db
from exactlyonce.outbox import Relay


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--crash-at-batch", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay_worker %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    engine = _db.create_engine(args.database_url)
    batches = 0

    @event.listens_for(engine, "before_cursor_execute")
    def crash_before_marking(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        nonlocal batches
        if statement.lstrip().upper().startswith("UPDATE EXACTLYONCE_OUTBOX"):
            batches += 1
            if batches == args.crash_at_batch:
                logging.getLogger("relay_worker").warning("batch %d sent; SIGKILL before marking it", batches)
                os.kill(os.getpid(), signal.SIGKILL)

    Relay(engine, args.bootstrap, batch_size=args.batch_size).run(threading.Event())


if __name__ == "__main__":
    main()
