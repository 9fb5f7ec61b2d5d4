"""The producer's pure parts: message IDs and value encoding."""

from __future__ import annotations

import time
import uuid

import pytest

from exactlyonce import ConfigurationError, Producer
from exactlyonce.producer import encode_value, new_message_id


def test_new_message_ids_are_uuid7_unique_and_time_ordered() -> None:
    """Generated IDs are RFC 9562 version-7 UUIDs, unique, and sort by creation time."""
    first = [new_message_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_message_id()
    parsed = uuid.UUID(later)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert len(set(first)) == 1000
    assert max(first) < later
    assert abs((parsed.int >> 80) - time.time() * 1000) < 5000


def test_encode_value() -> None:
    """Bytes pass through, text is UTF-8, objects are compact JSON with sorted keys (stable re-sends)."""
    assert encode_value(b"\x00raw") == b"\x00raw"
    assert encode_value("é") == "é".encode()
    assert encode_value({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def test_producer_needs_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bootstrap_servers or the variable, the error names the variable."""
    monkeypatch.delenv("EXACTLYONCE_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ConfigurationError, match="EXACTLYONCE_BOOTSTRAP_SERVERS"):
        Producer()
