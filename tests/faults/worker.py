"""A worker process for the fault tests.

``python -m tests.faults.worker TOPIC GROUP [--sleep S] [--sleep-first S]
[--consumer-config JSON] [--batch-size N]`` with ``EXACTLYONCE_BOOTSTRAP_SERVERS`` and
``EXACTLYONCE_DATABASE_URL`` set. Each record writes one ``effects`` row
(no unique constraint: a double effect shows as two rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from sqlalchemy.orm import Session

from exactlyonce import App, Message
from tests.integration.helpers import CONSUMER_CONFIG, insert_effect


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("topic")
    parser.add_argument("group")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds each record takes")
    parser.add_argument("--sleep-first", type=float, default=0.0,
                        help="extra seconds the first record this process sees takes")
    parser.add_argument("--consumer-config", default="{}")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(os.environ.get("WORKER_KAFKA_LOG_LEVEL", "WARNING"))
    app = App(args.group, consumer_config={**CONSUMER_CONFIG, **json.loads(args.consumer_config)})
    first = [True]

    @app.handler(args.topic, batch_size=args.batch_size)
    def handle(message: Message, session: Session) -> None:
        if first[0]:
            first[0] = False
            if args.sleep_first:
                logging.getLogger("worker").info("first record: sleeping %s s", args.sleep_first)
                time.sleep(args.sleep_first)
        time.sleep(args.sleep)
        insert_effect(session, (message.header("message-id") or b"").decode(), worker=str(os.getpid()))

    app.run()


if __name__ == "__main__":
    main()
