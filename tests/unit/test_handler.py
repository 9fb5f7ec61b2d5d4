"""handler: registration checks without an App, and the names app.py still exports."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import exactlyonce
from exactlyonce import ConfigurationError, Retry, app, handler, ids
from exactlyonce.handler import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MESSAGE_BATCH_SIZE,
    Handler,
    OnGap,
    OnMismatch,
    check_registration,
)


def noop(message: Any, session: Any) -> None:
    pass


async def async_handler(message: Any, session: Any) -> None:
    pass


async def async_generator_handler(message: Any, session: Any) -> Any:
    yield message


def test_check_registration_builds_the_handler_with_its_defaults() -> None:
    """Settings are checked when called; the returned make(func) builds the Handler an App would hold."""
    made = check_registration("t", group_id="g", registered=[], verifies_signatures=False)(noop)
    assert made == Handler(
        topic="t", func=noop, message_id=made.message_id, scope="g:t", dead_letter_topic="t.dlq", retry=Retry(),
        max_value_bytes=None, on_fingerprint_mismatch=OnMismatch.DEAD_LETTER, batch=False, batch_size=100,
    )
    assert made.message_id is not None and made.message_id.__qualname__ == ids.header().__qualname__
    sequenced = check_registration("s", group_id="g", registered=[], verifies_signatures=False,
                                   sequence=lambda m: ("a", 1), on_gap="dead_letter",
                                   gap_timeout=timedelta(seconds=1), on_fingerprint_mismatch="skip")(noop)
    assert sequenced.message_id is None
    assert sequenced.on_gap is OnGap.DEAD_LETTER and sequenced.on_fingerprint_mismatch is OnMismatch.SKIP


def test_settings_fail_before_the_function_is_given() -> None:
    """A bad setting fails at check_registration (the decorator's call), a bad function at make(func)."""
    with pytest.raises(ConfigurationError, match="batch_size must be an integer of at least 1"):
        check_registration("t", group_id="g", registered=[], verifies_signatures=False, batch_size=0)
    for bad in (True, 2.5, "10"):
        with pytest.raises(ConfigurationError, match="batch_size must be an integer"):
            check_registration("t", group_id="g", registered=[], verifies_signatures=False, batch_size=bad)
    make = check_registration("t", group_id="g", registered=[], verifies_signatures=False)
    assert make(noop).batch_size == DEFAULT_MESSAGE_BATCH_SIZE
    batch = check_registration("b", group_id="g", registered=[], verifies_signatures=False, batch=True)(noop)
    assert batch.batch_size == DEFAULT_BATCH_SIZE
    with pytest.raises(ConfigurationError, match="async generator function"):
        make(async_generator_handler)
    assert make(async_handler).is_async
    with pytest.raises(ConfigurationError, match="must be callable"):
        make("not a function")  # type: ignore[arg-type]


def test_registered_handlers_take_their_topic_and_scope() -> None:
    """A topic and a scope are taken once among the handlers passed as registered."""
    first = check_registration("t", group_id="g", registered=[], verifies_signatures=False)(noop)
    with pytest.raises(ConfigurationError, match="already registered"):
        check_registration("t", group_id="g", registered=[first], verifies_signatures=False)
    with pytest.raises(ConfigurationError, match="already used"):
        check_registration("u", group_id="g", name="g:t", registered=[first], verifies_signatures=False)
    check_registration("u", group_id="g", registered=[first], verifies_signatures=False)(noop)


def test_signature_rule_follows_verifies_signatures() -> None:
    """An ID from an unsigned header is refused only when the app verifies signatures."""
    from_other_header = ids.header("x-id")
    check_registration("t", group_id="g", registered=[], verifies_signatures=False, message_id=from_other_header)
    with pytest.raises(ConfigurationError, match="reads a header the signature does not cover"):
        check_registration("t", group_id="g", registered=[], verifies_signatures=True, message_id=from_other_header)


def test_app_and_package_export_the_same_objects() -> None:
    """exactlyonce.app keeps exporting what moved to exactlyonce.handler: the very same objects."""
    for name in ("Handler", "HandlerFunc", "OnGap", "OnMismatch", "SequenceFunc"):
        assert getattr(app, name) is getattr(handler, name), name
    for name in ("Handler", "OnGap", "OnMismatch"):
        assert getattr(exactlyonce, name) is getattr(handler, name), name
