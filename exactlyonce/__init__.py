"""exactlyonce: effectively-once Kafka consumers over a SQL database.

Each record's message ID is claimed in the same database transaction as the
handler's writes, and the Kafka offset is committed only after that
transaction commits: redelivered and re-sent records are skipped, and none is
lost. docs/guarantee.md states the guarantee precisely.

The less common names live in their modules: every exception in
:mod:`exactlyonce.errors`, the tables in :mod:`exactlyonce.storage.schema`,
migrations in :mod:`exactlyonce.storage.migrate`.
"""

from exactlyonce import ids
from exactlyonce.app import App
from exactlyonce.embedded import EmbeddedBroker
from exactlyonce.errors import (
    ConfigurationError,
    DeadLetter,
    ExactlyOnceError,
    MessageDecodeError,
    MessageError,
    Skip,
    TransientError,
)
from exactlyonce.handler import Handler, OnGap, OnMismatch
from exactlyonce.message import Message
from exactlyonce.outbox import publish
from exactlyonce.producer import Producer
from exactlyonce.retry import Retry
from exactlyonce.storage.store import Claim, claim

__all__ = [
    "App",
    "Claim",
    "ConfigurationError",
    "DeadLetter",
    "EmbeddedBroker",
    "ExactlyOnceError",
    "Handler",
    "Message",
    "MessageDecodeError",
    "MessageError",
    "OnGap",
    "OnMismatch",
    "Producer",
    "Retry",
    "Skip",
    "TransientError",
    "claim",
    "ids",
    "publish",
]
