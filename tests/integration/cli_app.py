"""The App the CLI test runs: ``python -m exactlyonce run tests.integration.cli_app:app``.

The topic and group come from ``EXACTLYONCE_TEST_TOPIC`` / ``EXACTLYONCE_TEST_GROUP``;
the broker and database from ``EXACTLYONCE_BOOTSTRAP_SERVERS`` /
``EXACTLYONCE_DATABASE_URL``, as for any App.
"""

from __future__ import annotations

import os

from sqlalchemy.orm import Session

from exactlyonce import App, Message
from tests.integration.helpers import CONSUMER_CONFIG, insert_effect

app = App(os.environ.get("EXACTLYONCE_TEST_GROUP", "exactlyonce-test-cli"),
          consumer_config=CONSUMER_CONFIG)


@app.handler(os.environ.get("EXACTLYONCE_TEST_TOPIC", "exactlyonce-test-cli"))
def handle(message: Message, session: Session) -> None:
    raw = message.header("message-id") or b""
    insert_effect(session, raw.decode(), (message.value or b"").decode(), worker="cli")
