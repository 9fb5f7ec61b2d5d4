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


def test_a_flush_whose_client_is_stuck_replaces_it_and_resends_there(monkeypatch: Any) -> None:
    """kafka-python's idempotent producer can stop expiring its batches (after broker restarts it waits for a
    producer ID forever); flush() used to wait for ever. Past stall_s the client is replaced and the records
    without an outcome are re-sent on the new one, although closing the old client failed them as closed
    (not retriable: they must not be taken for refused and dropped); flush then returns."""
    import kafka.errors

    from exactlyonce import producer as producer_module

    class Future:
        def __init__(self, done: bool) -> None:
            self.is_done = done
            self.exception: Exception | None = None

        def succeeded(self) -> bool:
            return self.is_done and self.exception is None

    clients: list[FakeClient] = []

    class FakeClient:
        stall_s = 130.0

        def __init__(self, *, bootstrap_servers: str, config: dict[str, Any]) -> None:
            self.stuck = not clients  # the first client never completes a record
            self.sent: list[str] = []
            self.flushed_with: list[float | None] = []
            self.closed = False
            self.futures: list[Future] = []
            clients.append(self)

        def send(self, topic: str, *, key: Any, value: Any, headers: Any, partition: Any = None) -> Future:
            message_id = dict(headers)["message-id"].decode()
            self.sent.append(message_id)
            # On the stuck client one record is acknowledged; the others never get an outcome.
            future = Future(done=not self.stuck or message_id == "m-1")
            self.futures.append(future)
            return future

        def flush(self, timeout_s: float | None = None) -> bool:
            self.flushed_with.append(timeout_s)
            return not self.stuck

        outcome = staticmethod(producer_module._kafka.RecordProducer.outcome)

        def close(self, timeout_s: float = 10.0) -> None:
            # As kafka-python's force-closed sender does: every open record fails, not retriable.
            self.closed = True
            for future in self.futures:
                if not future.is_done:
                    future.is_done, future.exception = True, kafka.errors.IllegalStateError("closed forcefully")

    monkeypatch.setattr(producer_module._kafka, "RecordProducer", FakeClient)
    monkeypatch.setattr(producer_module.time, "sleep", lambda s: None)
    producer = Producer("127.0.0.1:1")
    ids = [producer.send("t", {"n": n}, message_id=f"m-{n}") for n in range(3)]
    producer.flush()
    first, second = clients
    assert first.flushed_with == [130.0]  # one bounded wait, not an endless one
    assert first.closed and not second.closed
    assert first.sent == ids and second.sent == ["m-0", "m-2"]  # the acknowledged one is not sent again
    assert producer._pending == []


def test_a_bounded_flush_ends_at_its_deadline_without_replacing_the_client(monkeypatch: Any) -> None:
    """With a timeout shorter than stall_s the wait ends at the timeout: records not acknowledged are given up
    (TransientError naming them), and the client is kept (nothing says it is stuck rather than slow)."""
    from datetime import timedelta

    from exactlyonce import TransientError
    from exactlyonce import producer as producer_module

    made: list[Any] = []

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()

    class SlowClient:
        stall_s = 130.0

        def __init__(self, **_: Any) -> None:
            made.append(self)

        def send(self, topic: str, **_: Any) -> Any:
            return type("F", (), {"is_done": False, "exception": None, "succeeded": lambda self: False})()

        def flush(self, timeout_s: float | None = None) -> bool:
            clock.now += timeout_s or 0
            return False

        outcome = staticmethod(producer_module._kafka.RecordProducer.outcome)

    monkeypatch.setattr(producer_module._kafka, "RecordProducer", SlowClient)
    monkeypatch.setattr(producer_module, "time", type("T", (), {"monotonic": clock.monotonic,
                                                                 "sleep": lambda s: None,
                                                                 "time_ns": time.time_ns})())
    producer = Producer("127.0.0.1:1")
    producer.send("t", b"x", message_id="m-1")
    with pytest.raises(TransientError, match="m-1"):
        producer.flush(timedelta(seconds=5))
    assert len(made) == 1
