"""exactlyonce: effectively-once Kafka consumers over a SQL database.

Each record's message ID is claimed in the same database transaction as the
handler's writes, and the Kafka offset is committed only after that
transaction commits: redelivered and re-sent records are skipped, and none is
lost. See README.md for the precise guarantee.
"""

from exactlyonce import ids
from exactlyonce.app import App, Handler
from exactlyonce.embedded import EmbeddedBroker
from exactlyonce.errors import (
    ConfigurationError,
    ExactlyOnceError,
    InvalidMessageId,
    MessageDecodeError,
    MessageError,
    TransientError,
)
from exactlyonce.message import Message
from exactlyonce.schema import Outcome
from exactlyonce.store import Claim, claim

__all__ = [
    "App",
    "Claim",
    "ConfigurationError",
    "EmbeddedBroker",
    "ExactlyOnceError",
    "Handler",
    "InvalidMessageId",
    "Message",
    "MessageDecodeError",
    "MessageError",
    "Outcome",
    "TransientError",
    "claim",
    "ids",
]
