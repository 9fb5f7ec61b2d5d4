"""The public surface is small and deliberate."""

import exactlyonce


def test_public_names_are_pinned() -> None:
    """__all__ is sorted and lists exactly these names; a change here is an API change."""
    assert exactlyonce.__all__ == sorted(exactlyonce.__all__)
    assert exactlyonce.__all__ == [
        "App", "Claim", "ConfigurationError", "DeadLetter", "EmbeddedBroker", "ExactlyOnceError",
        "Handler", "Message", "MessageDecodeError", "MessageError", "OnGap", "OnMismatch", "Producer", "Retry", "Skip",
        "TransientError", "claim", "ids", "publish",
    ]
    for name in exactlyonce.__all__:
        assert getattr(exactlyonce, name) is not None


def test_error_tree() -> None:
    """Every exception derives from ExactlyOnceError, grouped as the errors docstring draws."""
    from exactlyonce import errors

    for exc in (errors.MessageDecodeError, errors.InvalidPayload, errors.InvalidMessageId, errors.OversizedValue,
                errors.FingerprintMismatch, errors.BadSequence, errors.SequenceGap, errors.BadSignature):
        assert issubclass(exc, errors.MessageError)
    assert issubclass(errors.Skip, errors.HandlerSignal)
    assert issubclass(errors.DeadLetter, errors.HandlerSignal)
    for exc in (errors.ConfigurationError, errors.MessageError, errors.TransientError,
                errors.HandlerSignal):
        assert issubclass(exc, errors.ExactlyOnceError)
    reasons = {c.reason for c in (errors.MessageDecodeError, errors.InvalidPayload, errors.InvalidMessageId,
                                  errors.OversizedValue, errors.FingerprintMismatch)}
    assert reasons == {"undecodable-value", "invalid-payload", "invalid-message-id", "oversized-value",
                       "fingerprint-mismatch"}
