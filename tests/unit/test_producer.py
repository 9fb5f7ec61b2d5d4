"""The producer's pure parts: message IDs and value encoding."""

from __future__ import annotations

import time
import uuid
from typing import Any

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


def test_close_is_bounded_by_its_timeout_however_many_batches_are_in_flight(monkeypatch: Any) -> None:
    """kafka-python's flush(timeout) waits `timeout` per batch in flight (minutes after a cluster restart);
    RecordProducer.close(timeout_s) waits about timeout_s in all, then abandons what is in flight.
    Counted on a fake clock that kafka-python's waits advance."""
    import kafka.errors

    from exactlyonce._kafka import RecordProducer, clients

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(clients, "time", clock)

    class Sender:
        force_closed = False

        def force_close(self) -> None:
            self.force_closed = True

        def join(self, timeout: float | None = None) -> None:
            pass

    class StuckProducer:
        """Twenty batches in flight that never complete: kafka-python waits `timeout` for each."""

        def __init__(self) -> None:
            self._sender = Sender()
            self.closed_with: list[float] = []

        def flush(self, timeout: float | None = None) -> None:
            clock.now += (timeout or 0) * 20
            raise kafka.errors.KafkaTimeoutError("Timeout waiting for future")

        def close(self, timeout: float | None = None) -> None:
            self.closed_with.append(timeout or 0)
            self.flush(timeout)

    stuck = StuckProducer()
    producer = RecordProducer.__new__(RecordProducer)
    producer._producer = stuck  # type: ignore[assignment]
    producer.close(10.0)
    # kafka-python's own close(10.0) here: 200 s; ours: the deadline plus one step's overrun.
    assert clock.now <= 10.0 + 0.1 * 20
    assert stuck._sender.force_closed
    assert stuck.closed_with == [0]
