"""sequence.parse: what a ``sequence=`` callable may return, and which reason a bad stream gets."""

from __future__ import annotations

from typing import Any

import pytest

from exactlyonce import Message
from exactlyonce import sequence as seq
from exactlyonce.errors import BadSequence, InvalidStream

MESSAGE = Message(topic="t", partition=0, offset=1, key=None, value=b"{}")


def test_a_good_stream_and_number_pass() -> None:
    assert seq.parse(("acct-\u00e9", 3), MESSAGE) == ("acct-\u00e9", 3)
    assert seq.parse(("s" * 255, 1), MESSAGE) == ("s" * 255, 1)


@pytest.mark.parametrize("stream", ["a\ud800", "nul\x00", "esc\x1b[0m", "x" * 256])
def test_streams_the_database_cannot_store_are_invalid_streams(stream: str) -> None:
    """A lone surrogate, a control character (NUL: PostgreSQL refuses it) or an over-long name: invalid-stream."""
    with pytest.raises(InvalidStream) as caught:
        seq.parse((stream, 1), MESSAGE)
    assert caught.value.reason == "invalid-stream"
    assert isinstance(caught.value, BadSequence)


@pytest.mark.parametrize("value", [("", 1), (5, 1), ("s", 0), ("s", True), ("s",), None])
def test_malformed_results_stay_bad_sequence(value: Any) -> None:
    with pytest.raises(BadSequence) as caught:
        seq.parse(value, MESSAGE)
    assert caught.value.reason == "bad-sequence"
