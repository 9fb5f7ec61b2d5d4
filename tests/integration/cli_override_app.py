"""The App `exactlyonce run` runs in test_tls with its connection settings on the command line.

Its own settings point nowhere (a closed port, an unusable database path, no
TLS): only ``--bootstrap-servers``, ``--database-url`` and ``--kafka-config``
make it work. The topics and group come from ``EXACTLYONCE_TEST_TOPIC``,
``EXACTLYONCE_TEST_OUT`` and ``EXACTLYONCE_TEST_GROUP``. The handler applies
each message, publishes one record per applied message through the outbox,
and dead-letters the message ``poison``.
"""

from __future__ import annotations

import os

from sqlalchemy.orm import Session

from exactlyonce import App, DeadLetter, Message, publish
from tests.integration.helpers import CONSUMER_CONFIG, insert_effect

app = App(os.environ.get("EXACTLYONCE_TEST_GROUP", "exactlyonce-test-override"),
          bootstrap_servers="127.0.0.1:1", database_url="sqlite:////nonexistent/exactlyonce-override.db",
          consumer_config=CONSUMER_CONFIG)


@app.handler(os.environ.get("EXACTLYONCE_TEST_TOPIC", "exactlyonce-test-override"))
def handle(message: Message, session: Session) -> None:
    message_id = message.json()["id"]
    if message_id == "poison":
        raise DeadLetter("poison")
    insert_effect(session, message_id)
    publish(session, os.environ.get("EXACTLYONCE_TEST_OUT", "exactlyonce-test-override-out"), {"done": message_id},
            message_id=f"done-{message_id}")
