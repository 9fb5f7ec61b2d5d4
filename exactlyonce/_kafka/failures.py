"""kafka-python's send errors, sorted by how a caller reacts: too large, refused for good, or transient."""

from __future__ import annotations

import kafka.errors

from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError

__all__ = ["RecordTooLarge", "is_collateral", "is_refusal", "is_retriable", "publish_failure"]


class RecordTooLarge(ConfigurationError):
    """The broker (or the producer's ``max_request_size``) refuses a record for its size."""


def publish_failure(topic: str, exc: BaseException, *, missing: bool = False) -> ExactlyOnceError:
    """The exactlyonce error for a failed publish to ``topic``: too large, refused for good, or transient.

    Only the refusals no retry can fix stop a caller; any other failure
    (retriable or not: a fenced or out-of-sequence producer, say) stays
    transient, as before; ``missing``: the cluster answered without the
    topic (the message then says to create it).
    """
    if isinstance(exc, _TOO_LARGE):
        return RecordTooLarge(f"topic {topic!r} refuses the record as too large ({type(exc).__name__}: {exc})")
    if is_refusal(exc) and not is_retriable(exc):
        return ConfigurationError(
            f"topic {topic!r} refuses the record for good ({type(exc).__name__}: {exc}): check the topic's "
            "name, configuration and ACLs (the producer's principal needs WRITE and DESCRIBE on it)"
        )
    if missing:
        # Transient still: the worker goes on by itself once the topic is created.
        return TransientError(
            f"publish to {topic!r} failed: the topic does not exist and the broker did not create it "
            f"(auto.create.topics.enable=false?); create it ({type(exc).__name__}: {exc})"
        )
    return TransientError(f"publish to {topic!r} failed: {exc}")


def is_retriable(exc: BaseException) -> bool:
    """Whether sending again may succeed (broker down, timeout, leader moved, ...)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, kafka.errors.KafkaTimeoutError | kafka.errors.KafkaConnectionError
    )


#: What the broker (or the client, for ``max_request_size``) says about a
#: record, or its topic, that sending it again cannot change. Anything else
#: that fails a record may be the fault of another record of its batch
#: (kafka-python fails the innocent records of a batch with a plain
#: ``KafkaError``), of the producer (an epoch bump fails the batches in
#: flight) or of the moment.
_TOO_LARGE: tuple[type[BaseException], ...] = (
    kafka.errors.MessageSizeTooLargeError,  # the record alone exceeds max.message.bytes / max_request_size
    kafka.errors.RecordListTooLargeError,
)
_REFUSALS: tuple[type[BaseException], ...] = (
    *_TOO_LARGE,
    kafka.errors.InvalidTopicError,
    kafka.errors.AuthorizationError,  # topic, cluster or transactional-id authorization
    kafka.errors.InvalidRecordError,  # the broker's record validation (e.g. a keyless record on a compacted topic)
    kafka.errors.InvalidTimestampError,
    kafka.errors.PolicyViolationError,
    kafka.errors.InvalidRequiredAcksError,
)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` says this record can never be written as it is (too large, topic invalid or forbidden).

    kafka-python splits a batch the broker finds too large and retries its
    records separately, so a size refusal names a record that is too large
    on its own.
    """
    return isinstance(exc, _REFUSALS)


def is_collateral(exc: BaseException) -> bool:
    """Whether ``exc`` failed a record for another record's fault (a batch-mate the broker found invalid)."""
    # kafka-python gives the innocent records of such a batch a bare KafkaError.
    return type(exc) is kafka.errors.KafkaError
