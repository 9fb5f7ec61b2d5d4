"""The test kit (exactlyonce.testing.TestApp): the real runtime, synchronously, with no broker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import exactlyonce
from exactlyonce import App, ConfigurationError, Message, Retry, TransientError, ids, signing
from exactlyonce.outcome import Outcome
from exactlyonce.storage import engine as _db
from exactlyonce.testing import Origin, TestApp

metadata = sa.MetaData()
# No unique constraint: a transfer applied twice would show as two rows.
applied = sa.Table("applied", metadata, sa.Column("transfer_id", sa.String(64)), sa.Column("amount", sa.Integer))

app = App("kit-issue")


@app.handler("transfers", message_id=ids.json_field("transfer_id"))
def take_transfer(message: Message, session: Session) -> None:
    transfer = message.json()
    session.execute(sa.text("SELECT :amount"), {"amount": transfer["amount"]})


bank = App("kit")


@bank.handler("transfers", message_id=ids.json_field("transfer_id"), retry=Retry(attempts=2))
def apply_transfer(message: Message, session: Session) -> None:
    transfer = message.json()
    if transfer.get("fail"):
        raise RuntimeError(f"cannot apply {transfer['transfer_id']}")
    session.execute(sa.insert(applied).values(transfer_id=transfer["transfer_id"], amount=transfer["amount"]))
    if transfer.get("notify"):
        exactlyonce.publish(session, "transfer-applied", {"transfer_id": transfer["transfer_id"]},
                            key=str(transfer["to"]), message_id=f"{transfer['transfer_id']}:applied")
    if transfer.get("fail_after_publish"):
        raise exactlyonce.DeadLetter("refused")


def test_transfer_applied_once(tmp_path: Path) -> None:
    # The example, verbatim.
    with TestApp(app, database_url=f"sqlite:///{tmp_path}/t.db") as t:   # creates the framework's tables
        t.send("transfers", {"transfer_id": "t1", "from": 1, "to": 2, "amount": 5})   # dict -> JSON; bytes/str too
        t.send("transfers", {"transfer_id": "t1", "from": 1, "to": 2, "amount": 5})
        assert t.outcomes == ["applied", "duplicate"]
        t.send("transfers", b"{not json")
        assert t.dead_letters[-1].reason == "undecodable-value"    # use the reasons the runtime already emits


def test_effects_are_read_through_a_session_on_the_test_database(tmp_path: Path) -> None:
    with TestApp(bank, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        metadata.create_all(t.engine)
        assert t.send("transfers", {"transfer_id": "t1", "amount": 5}) is Outcome.APPLIED
        # Text goes as UTF-8: the same bytes as the dict's compact JSON with sorted keys.
        assert t.send("transfers", '{"amount":5,"transfer_id":"t1"}') is Outcome.DUPLICATE
        # Other bytes under a known ID: the runtime's fingerprint check.
        assert t.send("transfers", '{"transfer_id": "t1", "amount": 5}') is Outcome.DEAD_LETTERED
        assert t.dead_letters[-1].reason == "fingerprint-mismatch"
        assert t.send("transfers", {"transfer_id": "t2", "amount": 7}) is Outcome.APPLIED
        with t.session() as session:
            rows = session.execute(sa.select(applied.c.transfer_id, applied.c.amount)
                                   .order_by(applied.c.transfer_id)).all()
        assert [tuple(row) for row in rows] == [("t1", 5), ("t2", 7)]
        assert (t.stats["applied"], t.stats["duplicate"], t.stats["fingerprint_mismatch"]) == (2, 1, 1)
        assert t.database_url == f"sqlite:///{tmp_path}/t.db"


def test_a_failing_handler_is_retried_then_dead_lettered_with_its_origin_and_headers(tmp_path: Path) -> None:
    with TestApp(bank, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        metadata.create_all(t.engine)
        t.send("transfers", {"transfer_id": "ok", "amount": 1})
        outcome = t.send("transfers", {"transfer_id": "t9", "amount": 1, "fail": True}, key="acct-1",
                         headers={"trace": "abc"})
        assert outcome == "dead_lettered"
        (letter,) = t.dead_letters
        assert letter.topic == "transfers.dlq"
        assert letter.reason == "handler-error"
        assert letter.origin == Origin("transfers", 0, 1) and str(letter.origin) == "transfers[0]@1"
        assert letter.headers == [("trace", b"abc")]
        assert letter.key == b"acct-1"
        assert letter.json() == {"transfer_id": "t9", "amount": 1, "fail": True}
        assert (letter.error_type, letter.message_id, letter.attempts) == ("RuntimeError", "t9", 2)
        assert "cannot apply t9" in letter.error_message
        decision = t.decisions[-1]
        assert (decision.outcome, decision.reason, decision.message_id) == ("dead_lettered", "handler-error", "t9")
        assert isinstance(decision.error, RuntimeError)
        # Its dead-letter row is a claim: a re-send is a duplicate, not a second dead letter.
        assert t.send("transfers", {"transfer_id": "t9", "amount": 1, "fail": True}) == "duplicate"
        assert len(t.dead_letters) == 1


def test_without_a_url_the_database_is_a_temporary_sqlite_file_deleted_at_exit() -> None:
    with TestApp(bank) as t:
        path = Path(t.engine.url.database or "")
        assert path.is_file()
        assert t.send("transfers", b"[]") == "dead_lettered"
    assert not path.exists()


def test_an_engine_of_the_tests_own_is_used_and_not_disposed(tmp_path: Path) -> None:
    engine = _db.create_engine(f"sqlite:///{tmp_path}/own.db")
    with pytest.raises(ConfigurationError, match="not both"):
        TestApp(bank, database_url="sqlite://", engine=engine)
    pool = engine.pool
    with TestApp(bank, engine=engine) as t:
        metadata.create_all(t.engine)
        assert t.send("transfers", {"transfer_id": "t1", "amount": 5}) == "applied"
    assert engine.pool is pool  # not disposed (dispose() replaces the pool)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(applied)).scalar_one() == 1
    engine.dispose()


def test_records_are_sent_as_given_and_message_id_adds_the_header(tmp_path: Path) -> None:
    by_header = App("kit-headers")
    seen: list[Message] = []

    @by_header.handler("orders")
    def handle(message: Message, session: Session) -> None:
        seen.append(message)

    with TestApp(by_header, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        # No message-id header: the default strategy cannot derive an ID.
        assert t.send("orders", b"x") == "dead_lettered"
        assert t.dead_letters[-1].reason == "invalid-message-id"
        assert t.send("orders", b"x", message_id="o-1") == "applied"
        assert t.send("orders", b"x", headers=[("message-id", b"o-1")]) == "duplicate"
        assert t.send("orders", None, headers={"message-id": "o-2"}, key=b"k") == "applied"
    assert [(m.value, m.key, m.header("message-id")) for m in seen] == [(b"x", None, b"o-1"), (None, b"k", b"o-2")]


def test_a_batch_handler_gets_the_records_of_one_process_in_one_call(tmp_path: Path) -> None:
    batched = App("kit-batch")
    calls: list[list[str]] = []

    @batched.handler("events", batch=True, batch_size=10)
    def handle(messages: list[Message], session: Session) -> None:
        calls.append([m.json()["n"] for m in messages])

    with TestApp(batched, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        for n in ("a", "b", "a", "c"):
            t.produce("events", {"n": n}, message_id=n)
        assert t.process() == ["applied", "applied", "duplicate", "applied"]
        assert calls == [["a", "b", "c"]]
        assert t.send("events", {"n": "d"}, message_id="d") == "applied"
        assert calls[-1] == ["d"]
        assert t.outcomes == ["applied", "applied", "duplicate", "applied", "applied"]


def test_a_sequenced_record_out_of_order_is_parked_then_applied(tmp_path: Path) -> None:
    ordered = App("kit-seq")
    lines: list[int] = []

    @ordered.handler("ledger", sequence=lambda m: (m.json()["account"], m.json()["seq"]))
    def handle(message: Message, session: Session) -> None:
        lines.append(message.json()["seq"])

    with TestApp(ordered, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        assert t.send("ledger", {"account": "a", "seq": 2}) == "parked"
        assert lines == []
        assert t.send("ledger", {"account": "a", "seq": 1}) == "applied"
        assert lines == [1, 2]
        assert t.send("ledger", {"account": "a", "seq": 2}) == "duplicate"
        assert t.outcomes == ["parked", "applied", "duplicate"]
        second = [(d.outcome, d.stream, d.number) for d in t.decisions if d.origin == Origin("ledger", 0, 0)]
        assert second == [("parked", "a", 2), ("applied", "a", 2)]
        # Two parked, then the gap filled within one process(): each record's first outcome.
        t.produce("ledger", {"account": "b", "seq": 3})
        t.produce("ledger", {"account": "b", "seq": 2})
        t.produce("ledger", {"account": "b", "seq": 1})
        assert t.process() == ["parked", "parked", "applied"]
        assert lines == [1, 2, 1, 2, 3]


def test_releases_cut_short_at_batch_size_are_finished_within_the_same_send(tmp_path: Path) -> None:
    ordered = App("kit-seq-bounded")
    lines: list[int] = []

    @ordered.handler("ledger", batch_size=2, sequence=lambda m: ("a", m.json()["seq"]))
    def handle(message: Message, session: Session) -> None:
        lines.append(message.json()["seq"])

    with TestApp(ordered, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        assert [t.send("ledger", {"seq": n}) for n in range(12, 1, -1)] == ["parked"] * 11
        # 1 releases 2..12: two per transaction, the rest continued between polls, all before send returns.
        assert t.send("ledger", {"seq": 1}) == "applied"
        assert lines == list(range(1, 13))
        assert sum(1 for d in t.decisions if d.outcome == "applied") == 12


def test_signing_key_signs_what_is_sent_and_a_wrong_key_is_a_bad_signature(tmp_path: Path) -> None:
    secret = b"s" * 32
    verifying = App("kit-signed", signing_keys={"k1": secret})

    @verifying.handler("orders")
    def handle(message: Message, session: Session) -> None:
        pass

    url = f"sqlite:///{tmp_path}/t.db"
    with TestApp(verifying, database_url=url, signing_key=("k1", secret)) as t:
        assert t.send("orders", {"n": 1}, message_id="o-1") == "applied"
        assert t.send("orders", {"n": 2}) == "applied"  # a new message ID, as exactlyonce.Producer adds one
        assert t.send("orders", None, key="k", message_id="o-3") == "applied"  # a tombstone's null value is signed
        record = t.cluster.records("orders")[0]
        signing.verify(Message(topic="orders", partition=0, offset=0, key=record.key, value=record.value,
                               headers=tuple(record.headers)), {"k1": secret})
    with TestApp(verifying, database_url=url, signing_key=("k1", b"w" * 32)) as wrong:
        assert wrong.send("orders", {"n": 1}, message_id="o-9") == "dead_lettered"
        assert wrong.dead_letters[-1].reason == "bad-signature"
    with TestApp(verifying, database_url=url) as unsigned:
        assert unsigned.send("orders", {"n": 1}, message_id="o-9") == "dead_lettered"
        assert unsigned.dead_letters[-1].reason == "bad-signature"


def test_published_shows_what_the_relay_would_send_and_nothing_of_a_rolled_back_handler(tmp_path: Path) -> None:
    with TestApp(bank, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        metadata.create_all(t.engine)
        assert t.published == []
        t.send("transfers", {"transfer_id": "t1", "amount": 5, "to": "acct-2", "notify": True})
        t.send("transfers", {"transfer_id": "t1", "amount": 5, "to": "acct-2", "notify": True})  # duplicate
        assert t.send("transfers", {"transfer_id": "t2", "amount": 5, "to": "acct-2", "notify": True,
                                    "fail_after_publish": True}) == "dead_lettered"
        assert t.dead_letters[-1].reason == "refused"
        (record,) = t.published
        assert (record.topic, record.key, record.message_id) == ("transfer-applied", b"acct-2", "t1:applied")
        assert record.json() == {"transfer_id": "t1"}
        assert record.headers == [("message-id", b"t1:applied")]


def test_published_records_are_signed_with_the_apps_signing_key(tmp_path: Path) -> None:
    secret = b"p" * 32
    signer = App("kit-publisher", signing_key=("out", secret))

    @signer.handler("in")
    def handle(message: Message, session: Session) -> None:
        exactlyonce.publish(session, "out", message.value or b"", message_id="m-1", headers=[("trace", b"t")])

    with TestApp(signer, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        t.send("in", b"hello", message_id="in-1")
        (record,) = t.published
        assert [name for name, _ in record.headers] == ["trace", "message-id", "exactlyonce-key-id",
                                                        "exactlyonce-signature"]
        signing.verify(Message(topic="out", partition=0, offset=0, key=None, value=record.value,
                               headers=tuple(record.headers)), {"out": secret})


def test_no_thread_is_left_behind(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    with TestApp(bank, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        metadata.create_all(t.engine)
        t.send("transfers", {"transfer_id": "t1", "amount": 5, "to": "a", "notify": True})
        t.send("transfers", {"transfer_id": "t2", "amount": 5, "fail": True})  # a dead letter: the producer twin
        assert set(threading.enumerate()) == before
    assert set(threading.enumerate()) == before


def test_a_record_the_runtime_keeps_rewinding_fails_the_process_instead_of_hanging(tmp_path: Path) -> None:
    flaky = App("kit-transient")
    outage = threading.Event()
    outage.set()

    @flaky.handler("orders")
    def handle(message: Message, session: Session) -> None:
        if outage.is_set():
            raise TransientError("the database went away")  # as a lost connection is seen

    with TestApp(flaky, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        with pytest.raises(TransientError, match=r"orders\[0\]@0 was not decided: the runtime rewound it 4"):
            t.send("orders", b"x", message_id="o-1")
        assert t.decisions == []
        # Nothing was committed: the next run gets the record again, as a worker's next poll would.
        outage.clear()
        assert t.process() == []
        assert [(d.origin, d.outcome) for d in t.decisions] == [(Origin("orders", 0, 0), "applied")]


def test_misuse_gets_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no handlers"):
        TestApp(App("empty"))
    with pytest.raises(ConfigurationError, match=r"exactlyonce\.App"):
        TestApp("app")  # type: ignore[arg-type]
    t = TestApp(bank, database_url=f"sqlite:///{tmp_path}/t.db")
    with pytest.raises(ConfigurationError, match="with block"):
        t.send("transfers", b"{}")
    with t:
        with pytest.raises(ConfigurationError, match=r"no handler for topic 'other'.*\['transfers'\]"):
            t.send("other", b"{}")
        with pytest.raises(ConfigurationError, match="partition"):
            t.send("transfers", b"{}", partition=-1)
        with pytest.raises(ConfigurationError, match="header"):
            t.send("transfers", b"{}", headers=[("h", 1)])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError, match="entered once"), t:
            pass
    with pytest.raises(ConfigurationError, match="with block"):
        t.session()
    with pytest.raises(ConfigurationError, match="signing key"):
        TestApp(bank, signing_key=("k", b"short"))


def test_records_on_other_partitions_are_read_too(tmp_path: Path) -> None:
    seen: list[Any] = []
    spread = App("kit-partitions")

    @spread.handler("orders", message_id=ids.key())
    def handle(message: Message, session: Session) -> None:
        seen.append((message.partition, message.offset))

    with TestApp(spread, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        assert t.send("orders", b"x", key="a", partition=2) == "applied"
        assert t.send("orders", b"x", key="a", partition=0) == "duplicate"
        assert t.send("orders", b"x", key="b", partition=1) == "applied"
    assert seen == [(2, 0), (1, 0)]


def test_async_handlers_run_on_the_real_runtime_too(tmp_path: Path) -> None:
    """An async def handler (with a sync one in the same App): applied once, its effects in the test database,
    dead letters as for sync handlers, and no thread left behind."""
    mixed = App("kit-async")

    @mixed.handler("transfers", message_id=ids.json_field("transfer_id"), retry=Retry(attempts=1))
    async def apply_async(message: Message, session: Any) -> None:
        transfer = message.json()
        if transfer.get("fail"):
            raise RuntimeError("cannot")
        await session.execute(sa.insert(applied).values(transfer_id=transfer["transfer_id"],
                                                        amount=transfer["amount"]))

    @mixed.handler("audit", message_id=ids.json_field("transfer_id"))
    def audit(message: Message, session: Session) -> None:
        session.execute(sa.insert(applied).values(transfer_id="audit-" + message.json()["transfer_id"], amount=0))

    before = set(threading.enumerate())
    with TestApp(mixed, database_url=f"sqlite:///{tmp_path}/t.db") as t:
        metadata.create_all(t.engine)
        assert t.send("transfers", {"transfer_id": "a1", "amount": 5}) == Outcome.APPLIED
        assert t.send("transfers", {"transfer_id": "a1", "amount": 5}) == Outcome.DUPLICATE
        assert t.send("audit", {"transfer_id": "a1"}) == Outcome.APPLIED
        assert t.send("transfers", {"transfer_id": "a2", "amount": 1, "fail": True}) == Outcome.DEAD_LETTERED
        assert t.dead_letters[-1].reason == "handler-error"
        with t.session() as session:
            rows = sorted(session.execute(sa.select(applied.c.transfer_id)).scalars())
        assert rows == ["a1", "audit-a1"]
    assert set(threading.enumerate()) <= before
