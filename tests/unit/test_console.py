"""The web console without services: Starlette's TestClient on SQLite, a fake broker where one is needed.

The same console against Apache Kafka and the three databases, and in a real
browser: tests/integration/test_console.py and test_console_browser.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from exactlyonce import Message, _db, admin, logs, migrate
from exactlyonce.cli import main
from exactlyonce.console import Settings, create_app
from exactlyonce.console.backend import Backend, History, Sample
from exactlyonce.console.security import CSRF_COOKIE
from exactlyonce.errors import ConfigurationError
from exactlyonce.schema import counters, outbox, processed, sequence_streams

TOKEN = "console-token-0123456789"
DLQ = "orders.dlq"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    logs.reset()


def dead_letter(offset: int, message_id: str, *, reason: str = "bad-data", value: bytes = b"v", partition: int = 0,
                timestamp: datetime | None = None, headers: list[tuple[str, bytes]] | None = None,
                error: str = "boom", scope: str = "g:orders") -> Message:
    """A record as the runner writes it to a dead-letter topic."""
    at = timestamp or datetime.now(UTC)
    meta = {"reason": reason, "error-type": "DeadLetter", "error-message": error, "topic": "orders",
            "partition": str(partition), "offset": str(offset + 100), "message-id": message_id, "attempts": "1",
            "scope": scope}
    return Message(topic=DLQ, partition=partition, offset=offset, timestamp_ms=int(at.timestamp() * 1000), key=b"k",
                   value=value, headers=(*(headers or []), ("message-id", message_id.encode()),
                                         *((f"x-exactlyonce-{k}", v.encode()) for k, v in meta.items())))


class FakeReader:
    """The part of admin.KafkaReader the console uses, over a list of dead-letter records."""

    def __init__(self, records: list[Message]) -> None:
        self.records = records

    def partitions(self, topic: str) -> list[int]:
        return sorted({r.partition for r in self.records if r.topic == topic})

    def end_offsets(self, topic: str, partitions: Any) -> dict[int, int]:
        return {p: 0 for p in partitions}

    def beginning_offsets(self, topic: str, partitions: Any) -> dict[int, int]:
        return {p: 0 for p in partitions}

    def committed(self, group_id: str, topic: str, partitions: Any) -> dict[int, int | None]:
        return {p: 0 for p in partitions}

    def read_all(self, topic: str, *, limit: int | None = None, newest: int | None = None,
                 idle_timeout_s: float = 10.0) -> list[Message]:
        found = sorted((r for r in self.records if r.topic == topic), key=lambda r: (r.timestamp_ms or 0, r.offset))
        return found[-newest:] if newest else found

    def read_at(self, topic: str, positions: Any) -> list[Message]:
        wanted = list(positions)
        return [r for p in wanted for r in self.records if r.topic == topic and (r.partition, r.offset) == p]

    def close(self) -> None:
        pass


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = _db.create_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(counters), [
            {"scope": "g:orders", "topic": "orders", "kafka_partition": p, "group_id": "g", "applied": 10 + p,
             "duplicates": 2, "skipped": 1, "dead_lettered": 3, "parked": 0, "last_offset": 20 + p,
             "last_processed_at": datetime(2026, 11, 1, 12, p)} for p in (0, 1)])
    engine.dispose()
    return url


def client_for(settings: Settings, records: list[Message] | None = None, **backend: Any) -> TestClient:
    factory = (lambda: FakeReader(records)) if records is not None else None
    app = create_app(settings, backend=Backend(settings, reader_factory=factory, **backend))  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1:8080")


def csrf_of(client: TestClient, page: str) -> str:
    """Load ``page`` and return the CSRF token of its form (the cookie holds the same)."""
    html = client.get(page).text
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    assert client.cookies.get(CSRF_COOKIE) == match[1]
    return match[1]


# -- status and overview -------------------------------------------------------


def test_api_status_is_the_document_of_status_json(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/status returns exactly what `exactlyonce status --json` prints (here without a broker)."""
    engine = _db.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(sequence_streams).values(
            scope="g:orders", stream="s-1", watermark=3, parked=2, gap_since=datetime(2026, 1, 1),
            updated_at=datetime(2026, 1, 1)))
        conn.execute(sa.insert(outbox).values(topic="out", key=None, value=b"x", headers="[]", message_id="o-1",
                                              ordering_key="0" * 64, created_at=datetime(2026, 2, 1)))
    engine.dispose()
    monkeypatch.delenv("EXACTLYONCE_BOOTSTRAP_SERVERS", raising=False)
    assert main(["status", "--json", "--database-url", db_url]) == 0
    printed = json.loads(capsys.readouterr().out)
    with client_for(Settings(database_url=db_url)) as client:
        served = client.get("/api/status")
    assert served.status_code == 200 and served.headers["content-type"].startswith("application/json")
    assert served.json() == printed
    (scope,) = printed["scopes"]
    assert (scope["applied"], scope["open_gaps"], scope["oldest_gap_since"]) == (21, 1, "2026-01-01T00:00:00+00:00")
    assert printed["outbox"]["oldest_pending_at"] == "2026-02-01T00:00:00+00:00"


def test_overview_shows_counts_and_highlights_problems(db_url: str) -> None:
    """Counts per scope; a gap past its timeout, a refused outbox row and a stale backlog are listed as problems."""
    engine = _db.create_engine(db_url)
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=30)
    with engine.begin() as conn:
        conn.execute(sa.insert(sequence_streams).values(scope="g:orders", stream="s-1", watermark=3, parked=2,
                                                        gap_since=old, updated_at=old))
        conn.execute(sa.insert(outbox), [
            {"topic": "out", "key": b"a", "value": b"x", "headers": "[]", "message_id": "o-1",
             "ordering_key": "1" * 64, "created_at": old, "refused_at": old, "refusal": "MessageSizeTooLarge"},
            {"topic": "out", "key": b"b", "value": b"y", "headers": "[]", "message_id": "o-2",
             "ordering_key": "2" * 64, "created_at": old, "refused_at": None, "refusal": None}])
    engine.dispose()
    with client_for(Settings(database_url=db_url, gap_timeouts={"g:orders": timedelta(minutes=10)})) as client:
        page = client.get("/").text
        overview = client.get("/api/overview").json()
    assert 'data-field="applied">21<' in page and 'data-field="duplicates">4<' in page
    kinds = {p["kind"]: p for p in overview["problems"]}
    assert {"gap-timeout", "outbox-refused", "outbox-backlog", "broker"} <= set(kinds)
    assert kinds["gap-timeout"]["severity"] == "error" and "10 min" in kinds["gap-timeout"]["text"]
    assert 'class="problem error" data-kind="gap-timeout"' in page
    assert "MessageSizeTooLarge" in page and 'class="problem error" data-kind="outbox-refused"' in page
    assert overview["status"]["outbox"]["pending"] == 2

    # Within the timeout, an open gap is shown but is no problem.
    with client_for(Settings(database_url=db_url, gap_timeouts={"g:orders": timedelta(hours=1)})) as client:
        assert "gap-timeout" not in {p["kind"] for p in client.get("/api/overview").json()["problems"]}


def test_history_rates_and_growing_lag() -> None:
    """Rates are counter deltas over the sampled window; lag rising without falling for 5 minutes is growing."""
    history = History()
    start = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    for minute, (applied, lag0, lag1) in enumerate([(0, 5, 9), (60, 7, 3), (120, 9, 9), (180, 12, 2)]):
        history.add(Sample(at=start + timedelta(minutes=2 * minute),
                           counts={("s", "applied"): applied, ("s", "duplicates"): 0, ("s", "skipped"): 0,
                                   ("s", "dead_lettered"): minute},
                           lags={("s", "t", 0): lag0, ("s", "t", 1): lag1}))
    now = start + timedelta(minutes=6)
    rates = history.rates(now)["s"]
    assert rates.rates["applied"].delta == 180 and rates.rates["applied"].per_minute == pytest.approx(30.0)
    assert rates.rates["dead_lettered"].delta == 3
    assert [v for _, v in rates.series["applied"]] == [30.0, 30.0, 30.0]
    # The last five minutes: the samples at 2, 4 and 6 minutes.
    assert history.growing(now) == {("s", "t", 0): (7, 12)}
    # An hour later the samples are out of the window: no rate, nothing growing.
    assert history.rates(now + timedelta(hours=2)) == {} and history.growing(now + timedelta(hours=2)) == {}


def test_overview_lists_growing_lag_and_draws_charts(db_url: str) -> None:
    """Samples taken while the console runs give the rate columns, the SVG charts and the growing-lag problem."""
    clock = [datetime.now(UTC) - timedelta(minutes=5)]
    settings = Settings(database_url=db_url, sample_interval=60)
    backend = Backend(settings, clock=lambda: clock[0])
    engine = _db.create_engine(db_url)
    for step in range(5):
        with engine.begin() as conn:
            conn.execute(sa.update(counters).values(applied=counters.c.applied + 30))
        status = backend.status()
        for scope in status.scopes:
            for p in scope.partitions:
                p.lag = 10 * step if p.partition == 1 else 0
        backend.history.add(Sample.of(status, clock[0]))
        clock[0] += timedelta(minutes=1)
    engine.dispose()
    with TestClient(create_app(settings, backend=backend), base_url="http://127.0.0.1:8080") as client:
        data = client.get("/api/overview").json()
        page = client.get("/").text
    assert data["rates"]["g:orders"]["applied"]["delta"] == 4 * 60
    assert data["lag_growing"] == [{"scope": "g:orders", "topic": "orders", "partition": 1, "from": 0, "to": 40}]
    assert "lag-growing" in {p["kind"] for p in data["problems"]}
    assert page.count("<svg") >= 3 and 'class="line series-applied"' in page and "orders[1]" in page
    assert 'data-field="applied-window">240<' in page


def test_database_down_is_said_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable database: the pages say so (200), the API answers 503, no password anywhere."""
    secret = "Db-Secret-Pa55-7781"
    url = f"postgresql://app:{secret}@127.0.0.1:1/app"
    with client_for(Settings(database_url=url)) as client:
        overview = client.get("/")
        status = client.get("/api/status")
        message = client.get("/messages?id=m-1")
    assert overview.status_code == 200 and "database unavailable" in overview.text
    assert 'data-kind="database"' in overview.text
    assert status.status_code == 503 and "database unavailable" in status.json()["error"]
    assert message.status_code == 200 and "database unavailable" in message.text
    for response in (overview, status, message):
        assert secret not in response.text
    assert "://app:***@127.0.0.1:1/app" in overview.text  # (the scheme too, if a test URL registered "postgres")


def test_broker_down_is_said_not_failed(db_url: str) -> None:
    """An unreachable broker: the counts are shown, the lag and the dead letters are reported unavailable."""
    settings = Settings(database_url=db_url, bootstrap_servers="127.0.0.1:1")
    with client_for(settings) as client:
        page = client.get("/").text
        dlq = client.get("/dlq/orders.dlq")
    assert 'data-field="applied">21<' in page and 'data-kind="broker"' in page
    assert "no Kafka broker answers at 127.0.0.1:1" in page
    assert dlq.status_code == 200 and "unavailable" in dlq.text


# -- dead letters -------------------------------------------------------------


def test_dead_letters_render_as_text_and_secrets_are_masked(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter's HTML (value, headers, reason, error) is escaped; secrets are ***; big values are cut."""
    monkeypatch.setenv("EXACTLYONCE_SIGNING_KEY", "k1:signing-secret-abcdef0123")
    logs.register_environment_secrets()
    evil = [
        dead_letter(0, "html-1", reason="<i>bad</i>", value=b"<script>alert('value')</script>",
                    error="<img src=x onerror=alert('error')>",
                    headers=[("trace<b>", b"<svg onload=alert('header')>")]),
        dead_letter(1, "secret-1", value=b'{"user": "bob", "password": "hunter2-hunter2"} signing-secret-abcdef0123'),
        dead_letter(2, "big-1", value=b"A" * 10_000 + b"<script>tail</script>"),
    ]
    with client_for(Settings(database_url=db_url), evil) as client:
        listing = client.get(f"/dlq/{DLQ}").text
        record = client.get(f"/dlq/{DLQ}/record/0/0").text
        secret = client.get(f"/dlq/{DLQ}/record/0/1").text
        big = client.get(f"/dlq/{DLQ}/record/0/2").text
        api = client.get(f"/api/dlq/{DLQ}").text
    for page in (listing, record):
        assert "<script>alert" not in page and "<img src=x" not in page and "<i>bad</i>" not in page
        assert "&lt;script&gt;alert(&#39;value&#39;)&lt;/script&gt;" in page
        assert "&lt;img src=x onerror=alert(&#39;error&#39;)&gt;" in page
    assert "&lt;svg onload=alert(&#39;header&#39;)&gt;" in record and "<svg onload" not in record
    assert "trace&lt;b&gt;" in record
    # Scripts on the page: only the console's own.
    assert re.findall(r"<script[^>]*>", record) == ['<script src="/static/console.js" defer>']
    assert "hunter2-hunter2" not in secret and "signing-secret-abcdef0123" not in secret and "***" in secret
    assert "hunter2-hunter2" not in api and "signing-secret-abcdef0123" not in api
    assert "the first 4,096 shown" in big and "tail" not in big and "10,021 bytes" in big


def test_dead_letter_filters(db_url: str) -> None:
    """Reason and time filters, on the page and in the API; a bad time is reported, not a 500."""
    now = datetime.now(UTC)
    records = [dead_letter(0, "a-1", reason="bad-data", timestamp=now - timedelta(hours=3)),
               dead_letter(1, "a-2", reason="handler-error", timestamp=now - timedelta(minutes=30)),
               dead_letter(2, "a-3", reason="bad-data", timestamp=now - timedelta(minutes=5))]
    with client_for(Settings(database_url=db_url), records) as client:
        def ids(query: str) -> list[str]:
            response = client.get(f"/api/dlq/{DLQ}?{query}")
            assert response.status_code == 200, response.text
            return [r["message_id"] for r in response.json()["records"]]

        assert ids("") == ["a-1", "a-2", "a-3"]
        assert ids("reason=bad-data") == ["a-1", "a-3"]
        assert ids("since=1h") == ["a-2", "a-3"]
        assert ids("reason=bad-data&since=1h") == ["a-3"]
        assert ids(f"until={(now - timedelta(hours=1)).isoformat().replace('+', '%2B')}") == ["a-1"]
        page = client.get(f"/dlq/{DLQ}?reason=handler-error").text
        assert 'data-message-id="a-2"' in page and 'data-message-id="a-1"' not in page
        bad = client.get(f"/dlq/{DLQ}?since=yesterday")
        assert bad.status_code == 200 and "invalid time" in bad.text
        assert client.get(f"/api/dlq/{DLQ}?since=yesterday").status_code == 400
        assert client.get("/api/dlq/no-such.dlq").status_code == 404


# -- replay guards -------------------------------------------------------------


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every call of admin.replay_to_topics (the only way the console changes anything), recorded, not run."""
    calls: list[list[str]] = []

    def fake(records: list[admin.DeadLetterRecord], **kwargs: Any) -> list[admin.ReplayItem]:
        calls.append([r.message_id or "" for r in records])
        return [admin.ReplayItem(r, "replayed") for r in records]

    monkeypatch.setattr(admin, "replay_to_topics", fake)
    return calls


def test_replay_needs_the_token_and_csrf(db_url: str, replays: list[list[str]]) -> None:
    """Without the token, with a wrong one, cross-site or without the page's CSRF token: 401/403, nothing sent."""
    settings = Settings(database_url=db_url, bootstrap_servers="fake:9092", token=TOKEN)
    with client_for(settings, [dead_letter(0, "m-1"), dead_letter(1, "m-2")]) as client:
        preview = client.get(f"/dlq/{DLQ}/replay?at=0@0")
        assert preview.status_code == 200 and 'data-action="would-replay"' in preview.text
        csrf = csrf_of(client, f"/dlq/{DLQ}/replay?at=0@0")
        url = f"/dlq/{DLQ}/replay"
        good = {"at": "0@0", "csrf": csrf, "token": TOKEN}
        refused = [
            ({**good, "token": ""}, {}, 401),
            ({**good, "token": TOKEN + "x"}, {}, 401),
            ({k: v for k, v in good.items() if k != "token"}, {}, 401),
            ({**good, "csrf": ""}, {}, 403),
            ({**good, "csrf": csrf[:-1] + ("0" if csrf[-1] != "0" else "1")}, {}, 403),
            (good, {"Origin": "http://evil.example"}, 403),
            (good, {"Sec-Fetch-Site": "cross-site"}, 403),
        ]
        for form, headers, code in refused:
            response = client.post(url, data=form, headers=headers)
            assert response.status_code == code, (form, headers, response.text)
            assert "Nothing was changed" in response.text
        # A cookie and field the attacker made up themselves (equal, but not signed by this console).
        client.cookies.set(CSRF_COOKIE, "forged.0000")
        assert client.post(url, data={**good, "csrf": "forged.0000"}).status_code == 403
        assert replays == []

        client.cookies.clear()
        csrf = csrf_of(client, f"/dlq/{DLQ}/replay?at=0@0")
        done = client.post(url, data={"at": ["0@0", "0@1"], "csrf": csrf, "token": TOKEN},
                           headers={"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"})
        assert done.status_code == 200, done.text
        assert 'data-summary="replayed"' in done.text and done.text.count('data-action="replayed"') == 2
    assert replays == [["m-1", "m-2"]]


def test_api_replay_needs_the_bearer_token(db_url: str, replays: list[list[str]]) -> None:
    """The JSON API: dry run by GET without a token; POST needs Authorization: Bearer and a JSON body."""
    settings = Settings(database_url=db_url, bootstrap_servers="fake:9092", token=TOKEN)
    with client_for(settings, [dead_letter(0, "m-1"), dead_letter(1, "m-2", reason="bad-signature")]) as client:
        dry = client.get(f"/api/dlq/{DLQ}/replay?at=0@0&at=0@1&at=0@9").json()
        assert [(i["message_id"], i["action"]) for i in dry["items"]] == [("m-1", "would-replay"),
                                                                          ("m-2", "skipped")]
        assert dry["missing"] == ["0@9"] and dry["dry_run"] is True
        url = f"/api/dlq/{DLQ}/replay"
        none = client.post(url, json={"at": ["0@0"]})
        assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
        assert client.post(url, json={"at": ["0@0"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post(url, data={"at": "0@0"}, headers=auth).status_code == 415
        cross = {**auth, "Sec-Fetch-Site": "cross-site"}
        assert client.post(url, json={"at": ["0@0"]}, headers=cross).status_code == 403
        assert client.post(url, json={"at": "0@0"}, headers=auth).status_code == 400
        assert client.post(url, json={"at": ["zero"]}, headers=auth).status_code == 400
        assert replays == []
        done = client.post(url, json={"at": ["0@0", "0@1"]}, headers=auth)
        assert done.status_code == 200
        assert [(i["message_id"], i["action"]) for i in done.json()["items"]] == [("m-1", "replayed"),
                                                                                   ("m-2", "replayed")]
    # The bad-signature record reached replay_to_topics, whose replay() skips it (the fake does not).
    assert replays == [["m-1", "m-2"]]


def test_read_only_console_refuses_every_replay(db_url: str, replays: list[list[str]]) -> None:
    """Without a configured token nothing can be replayed, whatever the request carries."""
    settings = Settings(database_url=db_url, bootstrap_servers="fake:9092")
    with client_for(settings, [dead_letter(0, "m-1")]) as client:
        preview = client.get(f"/dlq/{DLQ}/replay?at=0@0").text
        assert "read-only" in preview and 'method="post"' not in preview
        assert "exactlyonce dlq replay orders.dlq --at 0@0" in preview
        assert client.post(f"/dlq/{DLQ}/replay", data={"at": "0@0", "token": "x" * 20}).status_code == 403
        assert client.post(f"/api/dlq/{DLQ}/replay", json={"at": ["0@0"]},
                           headers={"Authorization": "Bearer " + "x" * 20}).status_code == 403
    assert replays == []


# -- pages, headers, settings --------------------------------------------------


def test_message_lookup(db_url: str) -> None:
    """A message ID's outcome, origin, time and fingerprint; an unknown one; the ID echoed as text."""
    engine = _db.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(processed).values(
            scope="g:orders", message_id="m-<b>1</b>", topic="orders", kafka_partition=1, kafka_offset=7,
            fingerprint="ab" * 32, outcome="dead_lettered", processed_at=datetime(2026, 11, 1, 12, 0)))
    engine.dispose()
    with client_for(Settings(database_url=db_url)) as client:
        page = client.get("/messages", params={"id": "m-<b>1</b>"}).text
        api = client.get("/api/messages/m-<b>1</b>")
        unknown = client.get("/messages", params={"id": "<script>x</script>", "scope": "g:orders"}).text
        assert client.get("/api/messages/nope").status_code == 404
    assert 'data-state="dead_lettered"' in page and "orders[1]@7" in page and "ab" * 32 in page
    assert "2026-11-01 12:00:00 UTC" in page and "dead letter in orders.dlq" in page
    assert "m-<b>1</b>" not in page and "m-&lt;b&gt;1&lt;/b&gt;" in page
    assert api.json()["findings"][0]["state"] == "dead_lettered"
    assert 'data-state="unknown"' in unknown and "<script>x" not in unknown


def test_security_headers_and_hosts(db_url: str) -> None:
    """Every response forbids framing and foreign scripts; a loopback console answers loopback Host names only."""
    settings = Settings(database_url=db_url, allowed_hosts=["127.0.0.1", "localhost"])
    with client_for(settings) as client:
        response = client.get("/")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert client.get("/static/console.js").headers["x-content-type-options"] == "nosniff"
        assert client.get("/", headers={"Host": "rebound.example"}).status_code == 400
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie


def test_settings_refuse_a_weak_token(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="at least 16"):
        Settings(database_url=db_url, token="short")
    with pytest.raises(ConfigurationError, match="refresh"):
        Settings(database_url=db_url, refresh_seconds=0)


def test_cli_console_serves_and_stops(db_url: str, tmp_path: Path) -> None:
    """`exactlyonce console --port 0` logs where it listens (never the token), serves, and exits on SIGTERM."""
    import httpx

    env = {"PATH": "/usr/bin:/bin", "EXACTLYONCE_CONSOLE_TOKEN": TOKEN, "EXACTLYONCE_DATABASE_URL": db_url}
    log_path = tmp_path / "console.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "exactlyonce", "console", "--port", "0"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            match = re.search(r"console at (http://127\.0\.0\.1:\d+/)", log_path.read_text())
        assert match, log_path.read_text()
        response = httpx.get(match[1] + "api/status", timeout=10)
        assert response.status_code == 200 and response.json()["scopes"][0]["applied"] == 21
        assert "replays allowed with the token" in log_path.read_text()
    finally:
        proc.terminate()
        code = proc.wait(20)
    assert code == 0, log_path.read_text()
    assert TOKEN not in log_path.read_text()


def test_cli_console_errors(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A short token or a taken port: one line on stderr, exit 2."""
    assert main(["console", "--database-url", db_url, "--token", "short"]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["console", "--database-url", db_url, "--port", str(port)]) == 2
        err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
