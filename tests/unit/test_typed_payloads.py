"""Typed payloads: ``model=`` validates each record once, before its claim; handlers, IDs and sequences read it.

Real Runners over the in-memory Kafka twins and SQLite, with a pydantic v2
model and a plain dataclass of the same shape.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
import sqlalchemy as sa

from exactlyonce import App, ConfigurationError, Message, MessageDecodeError, Retry, ids, migrate
from exactlyonce import payload as payloads
from exactlyonce.errors import InvalidMessageId, InvalidPayload
from exactlyonce.runtime.deadletter import split_headers
from exactlyonce.signing import sign
from exactlyonce.testing import Cluster, TwinRecord

TOPIC = "transfers"
SECRET = "sk_live_51HqQzSecretValue"

#: How many times each model's validation ran (pydantic: a model validator; dataclass: __post_init__).
validated: dict[str, int] = {}


class PydanticTransfer(pydantic.BaseModel):
    transfer_id: str
    account: str
    n: int = 1
    amount: int
    note: str | None = None

    @pydantic.field_validator("note")
    @classmethod
    def _no_passwords(cls, note: str | None) -> str | None:
        if note is not None and note.startswith("password="):
            raise ValueError(f"notes may not carry credentials: {note}")
        return note

    @pydantic.model_validator(mode="after")
    def _count(self) -> PydanticTransfer:
        validated["pydantic"] = validated.get("pydantic", 0) + 1
        return self


@dataclass(frozen=True)
class DataclassTransfer:
    transfer_id: str
    account: str
    amount: int
    n: int = 1
    note: str | None = None

    def __post_init__(self) -> None:
        if self.note is not None and self.note.startswith("password="):
            raise ValueError(f"notes may not carry credentials: {self.note}")
        validated["dataclass"] = validated.get("dataclass", 0) + 1


MODELS = {"pydantic": PydanticTransfer, "dataclass": DataclassTransfer}


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    validated.clear()
    return MODELS[request.param]


def _count(model: type) -> int:
    return validated.get("pydantic" if model is PydanticTransfer else "dataclass", 0)


def _app(tmp_path: Path, **kwargs: Any) -> App:
    app = App("g", bootstrap_servers="twin:9092", database_url=f"sqlite:///{tmp_path}/t.db", outbox=False,
              transient_retry_budget=timedelta(0), **kwargs)
    migrate.upgrade(app.engine)
    return app


def _send(cluster: Cluster, value: Any, *, headers: list[tuple[str, bytes]] | None = None,
          topic: str = TOPIC) -> TwinRecord:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return cluster.append(topic, 0, value=raw, headers=headers or [])


def _transfer(transfer_id: str, amount: Any = 5, **more: Any) -> dict[str, Any]:
    return {"transfer_id": transfer_id, "account": "acc-1", "amount": amount, **more}


def _dead_letters(cluster: Cluster) -> list[dict[str, str]]:
    return [split_headers(record.headers)[1] for record in cluster.records(f"{TOPIC}.dlq")]


def test_the_handler_reads_the_typed_payload_and_the_id_comes_from_it(tmp_path: Path, model: Any) -> None:
    app = _app(tmp_path)
    seen: list[Any] = []

    @app.handler(TOPIC, model=model, message_id=ids.field("transfer_id"))
    def handle(message: Message, session: Any) -> None:
        seen.append(message.payload)

    cluster = Cluster()
    _send(cluster, _transfer("t1", 5))
    _send(cluster, _transfer("t1", 5))            # a re-send: the same ID, read from the payload
    _send(cluster, _transfer("t2", 7, extra="ignored"))
    cluster.run_until_read(app)
    assert [type(p) for p in seen] == [model, model]
    assert [(p.transfer_id, p.amount) for p in seen] == [("t1", 5), ("t2", 7)]
    assert (app.stats["applied"], app.stats["duplicate"]) == (2, 1)
    assert _count(model) == 3  # once per record
    app.engine.dispose()


def test_a_callable_message_id_strategy_gets_the_typed_payload(tmp_path: Path, model: Any) -> None:
    app = _app(tmp_path)

    @app.handler(TOPIC, model=model, message_id=lambda m: f"{m.payload.account}/{m.payload.transfer_id}")
    def handle(message: Message, session: Any) -> None:
        pass

    cluster = Cluster()
    _send(cluster, _transfer("t1"))
    cluster.run_until_read(app)
    from exactlyonce.schema import processed

    with app.engine.connect() as conn:
        assert conn.execute(sa.select(processed.c.message_id)).scalars().all() == ["acc-1/t1"]
    app.engine.dispose()


def test_an_invalid_payload_is_dead_lettered_with_its_reason_and_no_value(tmp_path: Path, model: Any) -> None:
    app = _app(tmp_path)
    handled: list[Any] = []

    @app.handler(TOPIC, model=model, message_id=ids.field("transfer_id"))
    def handle(message: Message, session: Any) -> None:
        handled.append(message.payload)

    cluster = Cluster()
    _send(cluster, _transfer("t1", amount=SECRET))                  # a secret where a number goes
    _send(cluster, {"transfer_id": "t2", "amount": 1})             # a field missing
    _send(cluster, _transfer("t3", note=f"password={SECRET}"))     # the model's own check, quoting the value
    _send(cluster, b"{not json")
    _send(cluster, None)                                           # a tombstone
    _send(cluster, _transfer("t4"))
    cluster.run_until_read(app)
    assert [p.transfer_id for p in handled] == ["t4"]
    letters = _dead_letters(cluster)
    assert [letter["reason"] for letter in letters] == ["invalid-payload"] * 3 + ["undecodable-value"] * 2
    assert [letter["error-type"] for letter in letters] == ["InvalidPayload"] * 3 + ["MessageDecodeError"] * 2
    amount, missing, note = (letter["error-message"] for letter in letters[:3])
    assert "amount" in amount and "integer" in amount
    assert "account" in missing and "required" in missing.lower()
    assert "note" in note and "password=***" in note
    for letter in letters:
        assert SECRET not in letter["error-message"]
        assert letter["message-id"] == ""  # refused before any ID was read
    assert app.stats["dead_lettered:invalid-payload"] == 3
    assert app.stats["dead_lettered:undecodable-value"] == 2
    # A redelivery of the refused records is not dead-lettered twice (recorded under their coordinates).
    app2 = _app(tmp_path)
    app2.handler(TOPIC, model=model, message_id=ids.field("transfer_id"))(handle)
    cluster.store_offsets("g", {next(iter(cluster.partitions(TOPIC))): 0})
    cluster.run_until_read(app2)
    assert len(_dead_letters(cluster)) == 5 and app2.stats["duplicate"] == 6
    app.engine.dispose()
    app2.engine.dispose()


def test_the_error_text_is_bounded(tmp_path: Path) -> None:
    @dataclass
    class Wide:
        a0: int
        a1: int
        a2: int
        a3: int
        a4: int
        a5: int
        a6: int
        a7: int
        a8: int
        a9: int
        a10: int
        a11: int

    message = Message(topic="t", partition=0, offset=3, key=None, value=json.dumps({"x": "y" * 5000}).encode())
    with pytest.raises(InvalidPayload) as caught:
        payloads.typed(Wide, message)
    text = str(caught.value)
    assert text.startswith("t[0]@3: value is not a valid") and "(12 errors)" in text
    assert text.endswith("; and 2 more") and "a9: field required" in text and "a10" not in text


def test_batch_handlers_get_typed_payloads_and_a_split_batch_is_not_validated_again(
    tmp_path: Path, model: Any
) -> None:
    app = _app(tmp_path)
    batches: list[list[str]] = []

    @app.handler(TOPIC, model=model, message_id=ids.field("transfer_id"), batch=True, batch_size=10,
                 retry=Retry(attempts=1))
    def handle(messages: list[Message], session: Any) -> None:
        batches.append([m.payload.transfer_id for m in messages])
        if any(m.payload.amount == 13 for m in messages):
            raise RuntimeError("unlucky")

    cluster = Cluster()
    for n in range(4):
        _send(cluster, _transfer(f"t{n}", 13 if n == 2 else n))
    cluster.run_until_read(app)
    assert batches[0] == ["t0", "t1", "t2", "t3"]
    assert ["t0", "t1"] in batches and ["t3"] in batches
    assert app.stats["applied"] == 3 and app.stats["dead_lettered:handler-error"] == 1
    assert _count(model) == 4  # the halves reuse the typed messages
    app.engine.dispose()


def test_sequenced_handlers_read_their_numbers_from_the_payload(tmp_path: Path, model: Any) -> None:
    app = _app(tmp_path)
    order: list[tuple[str, int, type]] = []

    @app.handler(TOPIC, model=model, sequence=lambda m: (m.payload.account, m.payload.n))
    def handle(message: Message, session: Any) -> None:
        order.append((message.payload.transfer_id, message.payload.n, type(message.payload)))

    cluster = Cluster()
    _send(cluster, _transfer("c", n=3))
    _send(cluster, _transfer("b", n=2))   # parked, then released: typed again from the stored bytes
    _send(cluster, _transfer("a", n=1))
    _send(cluster, _transfer("a", n=1))   # a duplicate by number
    _send(cluster, _transfer("x", n="four"))
    cluster.run_until_read(app)
    assert order == [("a", 1, model), ("b", 2, model), ("c", 3, model)]
    assert app.stats["duplicate"] == 1 and app.stats["dead_lettered:invalid-payload"] == 1
    app.engine.dispose()


def test_a_forged_record_never_reaches_the_validator(tmp_path: Path, model: Any) -> None:
    key = ("k1", b"0123456789abcdef-secret")
    app = _app(tmp_path, signing_keys={"k1": key[1]})

    @app.handler(TOPIC, model=model, message_id=ids.field("transfer_id"))
    def handle(message: Message, session: Any) -> None:
        pass

    cluster = Cluster()
    genuine = json.dumps(_transfer("t1")).encode()
    _send(cluster, genuine, headers=[("message-id", b"m1"), *sign("m1", None, genuine, key)])
    forged = json.dumps(_transfer("t2")).encode()
    _send(cluster, forged, headers=[("message-id", b"m2"), *sign("m2", None, genuine, key)])
    _send(cluster, json.dumps(_transfer("t3", amount="x")).encode())  # unsigned and invalid: bad-signature
    cluster.run_until_read(app)
    assert app.stats["applied"] == 1
    assert [letter["reason"] for letter in _dead_letters(cluster)] == ["bad-signature", "bad-signature"]
    assert _count(model) == 1
    app.engine.dispose()


# -- registration -----------------------------------------------------------------


class NotAModel:
    transfer_id: str


@pytest.mark.parametrize("bad", [NotAModel, dict, int, DataclassTransfer("t", "a", 1), "Transfer"],
                         ids=["plain-class", "dict", "int", "instance", "string"])
def test_a_model_that_is_neither_pydantic_nor_a_dataclass_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="model="):
        App("g").handler(TOPIC, model=bad)


def test_dataclass_annotations_the_checker_cannot_check_are_refused() -> None:
    @dataclass
    class WithDate:
        at: datetime

    @dataclass
    class WithSet:
        tags: set[str]

    @dataclass
    class WithIntKeys:
        by_id: dict[int, str]

    for model in (WithDate, WithSet, WithIntKeys):
        with pytest.raises(ConfigurationError, match="use a pydantic model"):
            App("g").handler(TOPIC, model=model)


def test_pydantic_missing_is_reported_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    base = type("BaseModel", (), {"__module__": "pydantic.main"})
    model = type("Transfer", (base,), {})
    monkeypatch.setitem(sys.modules, "pydantic", None)  # import pydantic raises ImportError
    with pytest.raises(ConfigurationError, match=r"pydantic cannot be imported .*exactlyonce\[pydantic\]"):
        App("g").handler(TOPIC, model=model)


def test_pydantic_v1_models_are_refused() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic import v1

        class Old(v1.BaseModel):
            transfer_id: str

    with pytest.raises(ConfigurationError, match="not a pydantic v2 model"):
        App("g").handler(TOPIC, model=Old)


@dataclass
class Meta:
    id: str


@dataclass
class Envelope:
    meta: Meta | None
    extra: dict[str, Any]


def test_ids_field_needs_a_model_and_a_field_of_it() -> None:
    with pytest.raises(ConfigurationError, match=r"ids.field\('transfer_id'\) reads the typed payload.*json_field"):
        App("g").handler(TOPIC, message_id=ids.field("transfer_id"))
    with pytest.raises(ConfigurationError, match="has no field 'transfer'"):
        App("g").handler(TOPIC, model=PydanticTransfer, message_id=ids.field("transfer"))
    with pytest.raises(ConfigurationError, match="has no field 'transfer'"):
        App("g").handler(TOPIC, model=DataclassTransfer, message_id=ids.field("transfer"))

    App("g").handler(TOPIC, model=Envelope, message_id=ids.field("meta.id"))
    App("g").handler("other", model=Envelope, message_id=ids.field("extra.anything"))  # a dict: not checked further
    with pytest.raises(ConfigurationError, match="Meta has no field 'key'"):
        App("g").handler("third", model=Envelope, message_id=ids.field("meta.key"))
    assert App("g").handler(TOPIC, model=PydanticTransfer)(print) is print


def test_the_handler_records_its_model() -> None:
    app = App("g")
    app.handler(TOPIC, model=DataclassTransfer)(print)
    app.handler("raw")(print)
    assert app.handlers[TOPIC].model is DataclassTransfer and app.handlers["raw"].model is None


# -- ids.field ------------------------------------------------------------------------


class Kind(enum.Enum):
    A = "kind-a"


def _typed(payload: Any) -> Message:
    return Message(topic="t", partition=0, offset=1, key=None, value=b"{}", payload=payload)


@dataclass
class Inner:
    uid: uuid.UUID
    kind: Kind
    number: int


@dataclass
class Outer:
    inner: Inner
    extra: dict[str, Any]


def test_ids_field_reads_attributes_keys_uuids_and_enum_values() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    message = _typed(Outer(Inner(u, Kind.A, 42), {"ref": "r-1", "flag": True, "amount": 1.5}))
    assert ids.resolve(ids.field("inner.uid"), message) == str(u)
    assert ids.resolve(ids.field("inner.kind"), message) == "kind-a"
    assert ids.resolve(ids.field("inner.number"), message) == "42"
    assert ids.resolve(ids.field("extra.ref"), message) == "r-1"
    for path, problem in (("extra.flag", "got bool"), ("extra.amount", "got float"), ("extra.nope", "missing"),
                          ("inner.number.x", "missing")):
        with pytest.raises(InvalidMessageId, match=problem):
            ids.resolve(ids.field(path), message)
    with pytest.raises(InvalidMessageId, match="no typed payload"):
        ids.resolve(ids.field("x"), _typed(None))
    with pytest.raises(ValueError, match="invalid payload field path"):
        ids.field("a..b")
    assert ids.field_path(ids.field("a.b")) == "a.b" and ids.field_path(ids.json_field("a")) is None


def test_the_message_keeps_its_decoded_json_when_typed() -> None:
    message = Message(topic="t", partition=0, offset=1, key=None, value=json.dumps(_transfer("t1")).encode())
    decoded = message.json()
    typed = payloads.typed(DataclassTransfer, message)
    assert typed.payload == DataclassTransfer("t1", "acc-1", 5)
    assert typed.json() is decoded and typed == message  # the payload takes no part in equality


# -- the plain-dataclass checker ----------------------------------------------------


class Colour(enum.Enum):
    RED = 1
    BLUE = 2


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: str
    price: float
    lines: list[Line]
    colour: Colour
    status: Literal["new", "paid"]
    tags: tuple[str, ...] = ()
    pair: tuple[int, str] | None = None
    attrs: dict[str, int] = dataclasses.field(default_factory=dict)
    parent: Order | None = None
    anything: Any = None


def _order(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "o1", "price": 3, "lines": [{"sku": "s", "qty": 2}], "colour": 2,
                            "status": "paid"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def _check(value: Any) -> Any:
    return payloads.typed(Order, Message(topic="o", partition=0, offset=0, key=None,
                                         value=json.dumps(value).encode())).payload


def test_the_dataclass_checker_converts_what_fits() -> None:
    order = _check(_order(tags=["a", "b"], pair=[1, "x"], attrs={"k": 1}, parent=_order(id="o0"),
                          anything={"free": [1]}, unknown="ignored"))
    assert order == Order(id="o1", price=3.0, lines=[Line("s", 2)], colour=Colour.BLUE, status="paid",
                          tags=("a", "b"), pair=(1, "x"), attrs={"k": 1},
                          parent=Order(id="o0", price=3.0, lines=[Line("s", 2)], colour=Colour.BLUE, status="paid"),
                          anything={"free": [1]})
    assert isinstance(order.price, float)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"id": 5}, "id: expected a string, got an integer"),
    ({"price": "3"}, "price: expected a number, got a string"),
    ({"price": True}, "price: expected a number, got a boolean"),
    ({"lines": [{"sku": "s", "qty": "2"}]}, "lines[0].qty: expected an integer, got a string"),
    ({"lines": [{"sku": "s", "qty": True}]}, "lines[0].qty: expected an integer, got a boolean"),
    ({"lines": {"sku": "s"}}, "lines: expected an array, got an object"),
    ({"colour": 3}, "colour: expected one of Colour (1, 2), got an integer"),
    ({"status": "shipped"}, "status: expected one of 'new', 'paid', got a string"),
    ({"pair": [1, 2]}, "pair[1]: expected a string, got an integer"),
    ({"pair": [1]}, "pair: expected"),
    ({"attrs": {"k": "v"}}, "attrs['k']: expected an integer, got a string"),
    ({"parent": {"id": "p"}}, "parent.price: field required"),
    ({"id": ...}, "id: field required"),
])
def test_the_dataclass_checker_is_strict(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        _check(_order(**changes))
    assert problem in str(caught.value)


def test_the_dataclass_checker_wants_an_object_and_json() -> None:
    with pytest.raises(InvalidPayload, match=r"\(value\): expected an object \(Order\), got an array"):
        _check([1])
    with pytest.raises(MessageDecodeError):
        payloads.typed(Order, Message(topic="o", partition=0, offset=0, key=None, value=b"\xff"))


def test_pydantic_json_errors_are_undecodable_values() -> None:
    for value in (b"{", b"\xff\xfe", None):
        with pytest.raises(MessageDecodeError):
            payloads.typed(PydanticTransfer, Message(topic="o", partition=0, offset=0, key=None, value=value))
