"""The operator commands against a real broker and real databases: status, inspect, dlq list/replay, prune --json.

Each test runs an App (duplicates, dead letters) through the embedded broker,
stops it, and then drives ``exactlyonce.cli.main`` in-process, reading its
``--json`` output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import DeadLetter, Message, Retry, claim, logs
from exactlyonce.cli import main
from exactlyonce.schema import counters, processed, sequence_streams
from tests.conftest import drop_all_tables

from .helpers import (
    Rec,
    create_effects,
    create_topic,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    produce,
    read_topic,
    rec,
    running,
    subprocess_env,
    unique,
    wait_all_committed,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """main() installs a log handler on the captured stderr; remove it before capsys closes that stream."""
    yield
    logs.reset()


def _id(message: Message) -> str:
    return (message.header("message-id") or b"").decode()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``exactlyonce ARGV`` in this process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


class Scenario:
    """A topic handled by an App whose handler dead-letters the IDs in ``failing``."""

    def __init__(self, bootstrap: str, database_url: str, partitions: int = 2) -> None:
        self.bootstrap, self.database_url = bootstrap, database_url
        self.topic = unique("admin")
        self.dlq = f"{self.topic}.dlq"
        create_topic(bootstrap, self.topic, partitions)
        create_topic(bootstrap, self.dlq)
        self.engine = engine_for(database_url)
        create_effects(self.engine)
        self.failing: set[str] = set()
        self.app = make_app(bootstrap, database_url, outbox=False)
        self.scope = f"{self.app.group_id}:{self.topic}"

        @self.app.handler(self.topic, retry=Retry(attempts=1))
        def handle(message: Message, session: Session) -> None:
            if _id(message) in self.failing:
                raise DeadLetter("bad-data")
            insert_effect(session, _id(message))

    def produce(self, records: list[Rec]) -> list[tuple[int, int]]:
        return produce(self.bootstrap, self.topic, records)

    def consume(self) -> None:
        """Run the App until everything in the topic is handled and committed."""
        with running(self.app):
            wait_all_committed(self.bootstrap, self.app.group_id, self.topic)


@pytest.fixture
def scenario(bootstrap_servers: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", database_url)
    monkeypatch.setenv("EXACTLYONCE_BOOTSTRAP_SERVERS", bootstrap_servers)
    s = Scenario(bootstrap_servers, database_url)
    yield s
    s.engine.dispose()


def test_status_counts_gaps_and_lag(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    """status reports the runner's exact counts, open gaps per scope, and per-partition lag of the group."""
    scenario.failing = {"dead-1"}
    scenario.produce([rec("ok-1", partition=0), rec("ok-2", partition=1), rec("ok-1", partition=0),
                      rec("dead-1", partition=1), rec("ok-3", partition=0)])
    scenario.consume()
    # Not consumed: the lag. Two on partition 0, one on partition 1.
    scenario.produce([rec("late-1", partition=0), rec("late-2", partition=0), rec("late-3", partition=1)])
    with scenario.engine.begin() as conn:
        conn.execute(sa.insert(sequence_streams), [
            {"scope": scenario.scope, "stream": "s-1", "watermark": 4, "parked": 2,
             "gap_since": datetime(2026, 1, 1), "updated_at": datetime(2026, 1, 1)},
            {"scope": scenario.scope, "stream": "s-2", "watermark": 9, "parked": 0, "gap_since": None,
             "updated_at": datetime(2026, 1, 1)},
        ])

    data = cli_json(capsys, "status")
    assert data["lag_error"] is None
    (scope,) = data["scopes"]
    assert scope["scope"] == scenario.scope and scope["group_id"] == scenario.app.group_id
    assert (scope["applied"], scope["duplicates"], scope["dead_lettered"], scope["skipped"]) == (3, 1, 1, 0)
    assert scope["open_gaps"] == 1
    assert scope["last_processed_at"] is not None
    by_partition = {p["partition"]: p for p in scope["partitions"]}
    assert (by_partition[0]["committed"], by_partition[0]["end_offset"], by_partition[0]["lag"]) == (3, 5, 2)
    assert (by_partition[1]["committed"], by_partition[1]["end_offset"], by_partition[1]["lag"]) == (2, 3, 1)
    assert scope["lag"] == 3

    code, out, _ = cli(capsys, "status")
    assert code == 0
    assert scenario.scope in out and "gaps" in out and "consumer lag unknown" not in out


def test_status_without_a_broker_shows_the_database_part(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the broker unreachable, status still prints the counts and says the lag is unknown."""
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", database_url)
    engine = engine_for(database_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(counters).values(
            scope="g:t", topic="t", kafka_partition=0, group_id="g", applied=7, duplicates=2, skipped=1,
            dead_lettered=0, parked=0, last_offset=9, last_processed_at=datetime(2026, 11, 1, 12, 0)))
    engine.dispose()
    data = cli_json(capsys, "status", "--bootstrap-servers", "127.0.0.1:1")
    assert data["lag_error"]
    (scope,) = data["scopes"]
    assert (scope["applied"], scope["duplicates"], scope["skipped"], scope["lag"]) == (7, 2, 1, None)
    code, out, _ = cli(capsys, "status", "--bootstrap-servers", "127.0.0.1:1")
    assert code == 0
    assert "g:t" in out and "consumer lag unknown" in out


def test_inspect_applied_dead_lettered_parked_and_unknown(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect tells applied from dead-lettered (naming the dead-letter topic), parked and unknown (exit 1)."""
    scenario.failing = {"dead-1"}
    positions = scenario.produce([rec("ok-1", partition=0), rec("dead-1", partition=1)])
    scenario.consume()

    applied = cli_json(capsys, "inspect", "ok-1")
    (finding,) = applied["findings"]
    assert (finding["scope"], finding["state"], finding["topic"]) == (scenario.scope, "applied", scenario.topic)
    assert (finding["partition"], finding["offset"]) == positions[0]
    assert len(finding["fingerprint"]) == 64

    dead = cli_json(capsys, "inspect", "dead-1", "--scope", scenario.scope)
    (finding,) = dead["findings"]
    assert finding["state"] == "dead_lettered" and finding["dead_letter_topic"] == scenario.dlq
    code, out, _ = cli(capsys, "inspect", "dead-1")
    assert code == 0 and "dead-lettered" in out and scenario.dlq in out

    code, out, _ = cli(capsys, "inspect", "never-sent")
    assert code == 1 and "unknown" in out
    code, out, _ = cli(capsys, "inspect", "ok-1", "--scope", "another-scope", "--json")
    assert code == 1 and json.loads(out)["known"] is False

    from exactlyonce.schema import parked

    with scenario.engine.begin() as conn:
        conn.execute(sa.insert(parked).values(
            scope=scenario.scope, stream="acct-7", number=12, message_id="waiting-1", topic=scenario.topic,
            kafka_partition=0, kafka_offset=40, key=None, value=b"x", headers="[]", timestamp_ms=None,
            fingerprint="0" * 64, parked_at=datetime(2026, 11, 1)))
    (finding,) = cli_json(capsys, "inspect", "waiting-1")["findings"]
    assert (finding["state"], finding["stream"], finding["number"]) == ("parked", "acct-7", 12)


def test_dlq_list(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    """dlq list reads the dead-letter topic without a group and decodes the dead-letter headers."""
    scenario.failing = {"dead-1", "dead-2"}
    positions = scenario.produce([rec("dead-1", partition=0), rec("ok-1", partition=0), rec("dead-2", partition=1)])
    scenario.consume()

    records = cli_json(capsys, "dlq", "list", scenario.dlq)
    # (The two partitions are handled in either order, so either may be dead-lettered first.)
    by_id = {r["message_id"]: r for r in records}
    assert sorted(by_id) == ["dead-1", "dead-2"] and len(records) == 2
    first = by_id["dead-1"]
    assert (first["topic"], first["partition"], first["offset"]) == (scenario.topic, *positions[0])
    assert first["reason"] == "bad-data" and first["error_type"] == "DeadLetter"
    assert first["scope"] == scenario.scope and first["value"] == "v:dead-1"
    assert first["dlq_partition"] == 0 and first["dlq_offset"] in (0, 1) and first["timestamp"]
    assert sorted(r["dlq_offset"] for r in records) == [0, 1]

    assert [r["message_id"] for r in cli_json(capsys, "dlq", "list", scenario.dlq, "--limit", "1")] == [
        records[0]["message_id"]]
    code, out, _ = cli(capsys, "dlq", "list", scenario.dlq)
    assert code == 0 and "bad-data" in out and "dead-2" in out
    code, _, err = cli(capsys, "dlq", "list", unique("no-such-topic"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_dlq_replay(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    """Replays: selection by --id and time, --dry-run, refusal without --yes, and twice -> applied once."""
    scenario.failing = {"dead-1", "dead-2"}
    scenario.produce([rec("dead-1", partition=0), rec("ok-1", partition=0), rec("dead-2", partition=1)])
    scenario.consume()
    # A record someone wrote to the DLQ by hand: no original-topic header.
    produce(scenario.bootstrap, scenario.dlq, [rec("stray-1")])
    assert effect_counts(scenario.engine) == {"ok-1": 1}
    scenario.failing = set()  # the bug is fixed
    topic_size = len(read_topic(scenario.bootstrap, scenario.topic))

    # Time filters select nothing outside the window, so nothing is sent.
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    report = cli_json(capsys, "dlq", "replay", scenario.dlq, "--since", future)
    assert report["selected"] == 0 and report["items"] == []
    report = cli_json(capsys, "dlq", "replay", scenario.dlq, "--until", "2000-01-01T00:00:00")
    assert report["selected"] == 0

    # A dry run lists what would go, and sends nothing.
    report = cli_json(capsys, "dlq", "replay", scenario.dlq, "--since", "1h", "--dry-run")
    assert {(i["message_id"], i["action"]) for i in report["items"]} == {
        ("dead-1", "would-replay"), ("dead-2", "would-replay"), ("stray-1", "skipped")}
    assert len(read_topic(scenario.bootstrap, scenario.topic)) == topic_size

    # All of them, without a filter: refused when nobody can confirm.
    code, _, err = cli(capsys, "dlq", "replay", scenario.dlq)
    assert code == 2 and "--yes" in err and "not a terminal" in err
    assert len(read_topic(scenario.bootstrap, scenario.topic)) == topic_size

    with running(scenario.app):
        # Twice, back to back: both copies reach the topic, the handler applies one.
        for _ in range(2):
            report = cli_json(capsys, "dlq", "replay", scenario.dlq, "--id", "dead-1")
            assert [(i["message_id"], i["action"]) for i in report["items"]] == [("dead-1", "replayed")]
        report = cli_json(capsys, "dlq", "replay", scenario.dlq, "--yes")
        actions = {(i["message_id"], i["action"]) for i in report["items"]}
        assert actions == {("dead-1", "replayed"), ("dead-2", "replayed"), ("stray-1", "skipped")}
        wait_all_committed(scenario.bootstrap, scenario.app.group_id, scenario.topic)

    assert effect_counts(scenario.engine) == {"ok-1": 1, "dead-1": 1, "dead-2": 1}
    # The originals plus the copies: dead-1 three times, dead-2 once, with their original values
    # and without the dead-letter headers.
    records = read_topic(scenario.bootstrap, scenario.topic)
    assert Counter(_header(r, "message-id") for r in records) == {"dead-1": 4, "dead-2": 2, "ok-1": 1}
    assert all(not name.startswith("x-exactlyonce-") for r in records for name, _ in r.headers)
    assert all(r.value == f"v:{_header(r, 'message-id')}".encode() for r in records)
    with scenario.engine.connect() as conn:
        outcomes = {mid: outcome for mid, outcome in conn.execute(
            sa.select(processed.c.message_id, processed.c.outcome).where(processed.c.scope == scenario.scope))}
    assert outcomes == {"ok-1": "applied", "dead-1": "applied", "dead-2": "applied"}


def _header(record: Any, name: str) -> str | None:
    return next(((v or b"").decode() for n, v in record.headers or () if n == name), None)


def test_replay_refused_in_a_real_process_without_a_terminal(
    bootstrap_servers: str, tmp_path: Any
) -> None:
    """The console script itself: no terminal on stdin and no --yes -> exit 2, one line, no traceback."""
    dlq = unique("refuse") + ".dlq"
    create_topic(bootstrap_servers, dlq)
    produce(bootstrap_servers, dlq, [Rec(value=b"x", message_id="m-1",
                                         headers=(("x-exactlyonce-topic", b"somewhere"),))])
    env = subprocess_env(EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap_servers,
                         EXACTLYONCE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
    done = subprocess.run([sys.executable, "-m", "exactlyonce", "dlq", "replay", dlq], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("exactlyonce: error: refusing to replay all 1 dead letter(s)"), done.stderr
    assert "Traceback" not in done.stderr


def test_prune_json(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """prune --json reports the table and the number of rows deleted."""
    engine = engine_for(database_url)
    message = Message(topic="t", partition=0, offset=0, key=None, value=b"v")
    with Session(engine) as session, session.begin():
        for n in range(5):
            claim(session, "scope", f"old-{n}", message)
        claim(session, "scope", "new-0", message)
        session.execute(sa.update(processed).where(processed.c.message_id.like("old-%"))
                        .values(processed_at=datetime.now(UTC).replace(tzinfo=None) - timedelta(days=30)))
    data = cli_json(capsys, "prune", "--older-than", "15d", "--batch-size", "2", "--database-url", database_url)
    assert data["table"] == "exactlyonce_processed" and data["deleted"] == 5
    assert data["older_than_seconds"] == 15 * 86400
    data = cli_json(capsys, "prune", "--outbox", "--older-than", "1d", "--database-url", database_url)
    assert data == {**data, "table": "exactlyonce_outbox", "deleted": 0}
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(processed.c.message_id)).scalars()) == ["new-0"]
    engine.dispose()


def test_status_and_logs_never_show_secrets(
    bootstrap_servers: str, postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database password, a SASL password and a signing secret reach neither stdout, stderr nor the logs."""
    from sqlalchemy.engine import make_url

    from exactlyonce import _db, migrate

    db_secret, sasl_secret, signing_secret = "Db-Pa55word-9f2", "Sasl-Pa55word-4c1", "signing-secret-0123456789abcdef"
    # A login role whose password is the secret (the session's own role keeps its password).
    admin_engine = _db.create_engine(postgres_url)
    with admin_engine.begin() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'exactlyonce_secrets'")).first()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sa.text(f"{verb} ROLE exactlyonce_secrets LOGIN SUPERUSER PASSWORD '{db_secret}'"))
    admin_engine.dispose()
    url = (make_url(postgres_url).set(username="exactlyonce_secrets", password=db_secret)
           .render_as_string(hide_password=False))
    engine = _db.create_engine(url)
    drop_all_tables(url)
    migrate.upgrade(engine)
    topic = unique("secrets")
    create_topic(bootstrap_servers, topic)
    with engine.begin() as conn:
        conn.execute(sa.insert(counters).values(
            scope=f"g:{topic}", topic=topic, kafka_partition=0, group_id="g", applied=1, duplicates=0, skipped=0,
            dead_lettered=0, parked=0, last_offset=0, last_processed_at=datetime(2026, 11, 1, 12, 0)))
    engine.dispose()
    monkeypatch.setenv("EXACTLYONCE_SIGNING_KEY", f"k1:{signing_secret}")
    secrets = (db_secret, sasl_secret, signing_secret)
    for fmt in ("text", "json"):
        code, out, err = cli(capsys, "--log-level", "DEBUG", "--log-format", fmt, "status", "--database-url", url,
                             "--bootstrap-servers", bootstrap_servers,
                             "--kafka-config", f"sasl_plain_password={sasl_secret}")
        assert code == 0, err
        assert "***" in out  # the database URL is shown, masked
        assert "sasl_plain_password" in err  # the debug line naming the client settings was logged
        for secret in secrets:
            assert secret not in out and secret not in err
    # An error names what failed, without the password.
    missing = make_url(url).set(database="exactlyonce_no_such_db").render_as_string(hide_password=False)
    code, out, err = cli(capsys, "--log-level", "DEBUG", "prune", "--older-than", "14d", "--database-url", missing)
    assert code == 2 and "exactlyonce_no_such_db" in err
    for secret in secrets:
        assert secret not in out and secret not in err
