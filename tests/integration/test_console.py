"""The console's JSON API against a real broker and the three databases, and the CLI options it shares.

The console is driven with Starlette's TestClient here; the same flows in a
real browser are in test_console_browser.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from exactlyonce import logs
from exactlyonce.cli import main
from exactlyonce.console import Settings, create_app
from exactlyonce.schema import processed

from .helpers import Rec, create_topic, effect_counts, produce, read_topic, rec, running, unique, wait_all_committed
from .test_admin_cli import Scenario

TOKEN = "integration-console-token-42"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    logs.reset()


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_console_api_on_real_traffic(
    bootstrap_servers: str, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status equals `status --json` (lag included); a dead letter is listed, dry-run, replayed twice, applied once."""
    monkeypatch.setenv("EXACTLYONCE_DATABASE_URL", database_url)
    monkeypatch.setenv("EXACTLYONCE_BOOTSTRAP_SERVERS", bootstrap_servers)
    s = Scenario(bootstrap_servers, database_url)
    s.failing = {"dead-1"}
    s.produce([rec("ok-1", partition=0), rec("ok-2", partition=1), rec("ok-1", partition=0),
               rec("dead-1", partition=1)])
    s.consume()
    s.produce([rec("late-1", partition=0)])  # not consumed: a lag of 1

    settings = Settings(database_url=database_url, bootstrap_servers=bootstrap_servers, token=TOKEN,
                        sample_interval=60)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        served = client.get("/api/status")
        assert served.status_code == 200
        assert served.json() == cli_json(capsys, "status")
        (scope,) = served.json()["scopes"]
        assert (scope["applied"], scope["duplicates"], scope["dead_lettered"], scope["lag"]) == (2, 1, 1, 1)

        overview = client.get("/api/overview").json()
        (topic,) = overview["dead_letter_topics"]
        assert (topic["topic"], topic["records_read"], topic["reasons"]) == (s.dlq, 1, {"bad-data": 1})

        (record,) = client.get(f"/api/dlq/{s.dlq}").json()["records"]
        assert (record["message_id"], record["reason"], record["topic"]) == ("dead-1", "bad-data", s.topic)
        place = f"{record['dlq_partition']}@{record['dlq_offset']}"
        assert client.get("/api/messages/dead-1").json()["findings"][0]["state"] == "dead_lettered"

        dry = client.get(f"/api/dlq/{s.dlq}/replay", params={"at": place}).json()
        assert [(i["message_id"], i["action"]) for i in dry["items"]] == [("dead-1", "would-replay")]
        size = len(read_topic(bootstrap_servers, s.topic))
        assert client.post(f"/api/dlq/{s.dlq}/replay", json={"at": [place]}).status_code == 401
        assert len(read_topic(bootstrap_servers, s.topic)) == size

        s.failing = set()  # fixed
        with running(s.app):
            for _ in range(2):
                done = client.post(f"/api/dlq/{s.dlq}/replay", json={"at": [place]},
                                   headers={"Authorization": f"Bearer {TOKEN}"})
                assert done.status_code == 200, done.text
                assert [i["action"] for i in done.json()["items"]] == ["replayed"]
            wait_all_committed(bootstrap_servers, s.app.group_id, s.topic)
        assert len(read_topic(bootstrap_servers, s.topic)) == size + 2
        assert effect_counts(s.engine) == {"ok-1": 1, "ok-2": 1, "dead-1": 1, "late-1": 1}
        (finding,) = client.get("/api/messages/dead-1").json()["findings"]
        assert finding["state"] == "applied"
    with s.engine.connect() as conn:
        assert conn.execute(sa.select(processed.c.outcome).where(processed.c.message_id == "dead-1")).scalar_one() \
            == "applied"
    s.engine.dispose()


def test_cli_dead_letter_filters_and_positions(bootstrap_servers: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`dlq list --last/--reason` and `dlq replay --at/--reason --dry-run`: the selections the console uses."""
    dlq = unique("filters") + ".dlq"
    create_topic(bootstrap_servers, dlq)

    def letter(message_id: str, reason: str) -> Rec:
        return Rec(value=b"v", message_id=message_id,
                   headers=(("x-exactlyonce-topic", b"orders"), ("x-exactlyonce-reason", reason.encode()),
                            ("x-exactlyonce-partition", b"0")))

    produce(bootstrap_servers, dlq, [letter("m-1", "bad-data"), letter("m-2", "handler-error"),
                                     letter("m-3", "bad-data")])
    servers = ["--bootstrap-servers", bootstrap_servers]
    assert [r["message_id"] for r in cli_json(capsys, "dlq", "list", dlq, "--last", "2", *servers)] == ["m-2", "m-3"]
    assert [r["message_id"] for r in cli_json(capsys, "dlq", "list", dlq, "--reason", "bad-data", *servers)] == [
        "m-1", "m-3"]
    report = cli_json(capsys, "dlq", "replay", dlq, "--at", "0@1", "--at", "0@2", "--dry-run", *servers)
    assert [(i["message_id"], i["action"]) for i in report["items"]] == [("m-2", "would-replay"),
                                                                         ("m-3", "would-replay")]
    report = cli_json(capsys, "dlq", "replay", dlq, "--reason", "bad-data", "--dry-run", *servers)
    assert [i["message_id"] for i in report["items"]] == ["m-1", "m-3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["dlq", "replay", dlq, "--at", "zero", *servers])
    assert exit_.value.code == 2 and "PARTITION@OFFSET" in capsys.readouterr().err
