"""The public surface is small and deliberate."""

import exactlyonce


def test_public_names_are_pinned() -> None:
    """__all__ is sorted and lists exactly these names; a change here is an API change."""
    assert exactlyonce.__all__ == sorted(exactlyonce.__all__)
    assert exactlyonce.__all__ == [
        "App", "Claim", "ConfigurationError", "EmbeddedBroker", "ExactlyOnceError", "Handler",
        "InvalidMessageId", "Message", "MessageDecodeError", "MessageError", "Outcome",
        "TransientError", "claim", "ids",
    ]
    for name in exactlyonce.__all__:
        assert getattr(exactlyonce, name) is not None


def test_error_tree() -> None:
    """Every exception derives from ExactlyOnceError, grouped as the errors docstring draws."""
    assert issubclass(exactlyonce.MessageDecodeError, exactlyonce.MessageError)
    assert issubclass(exactlyonce.InvalidMessageId, exactlyonce.MessageError)
    for exc in (exactlyonce.ConfigurationError, exactlyonce.MessageError, exactlyonce.TransientError):
        assert issubclass(exc, exactlyonce.ExactlyOnceError)
