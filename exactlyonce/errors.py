"""Every exception exactlyonce raises, grouped by how the caller should react.

::

    ExactlyOnceError
    ├── ConfigurationError     fix the settings and start again
    ├── MessageError           permanent: this message can never be handled as it is
    │   ├── MessageDecodeError     the value is not what the handler or ID strategy needs
    │   └── InvalidMessageId       missing, empty, non-text or over-long message ID
    └── TransientError         retry later: the database or broker is unavailable

Exceptions from SQLAlchemy and kafka-python are translated at the boundary
(``raise ... from exc``) so callers never need to import either library to
react to a failure.
"""

from __future__ import annotations


class ExactlyOnceError(Exception):
    """Base class of every exactlyonce exception."""


class ConfigurationError(ExactlyOnceError):
    """The application is configured wrongly (missing URL, duplicate handler, ...)."""


class MessageError(ExactlyOnceError):
    """A message that cannot be handled as it is; retrying will not help.

    The runner dead-letters such a message instead of retrying it.
    """

    #: Short machine-readable reason, written to the dead-letter headers.
    reason = "bad-message"


class MessageDecodeError(MessageError):
    """The message value could not be decoded (for example, it is not valid JSON)."""

    reason = "undecodable-value"


class InvalidMessageId(MessageError):
    """The message ID strategy produced no usable ID (missing, empty or too long)."""

    reason = "invalid-message-id"


class TransientError(ExactlyOnceError):
    """A dependency (database or broker) failed in a way that may pass; retry later."""
