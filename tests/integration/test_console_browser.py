"""The console end to end: `exactlyonce console` as a process, real traffic, headless Chromium.

Records go through Apache Kafka into an App on PostgreSQL (duplicates, dead
letters, one of them full of HTML); the console started by the real command
is opened in Chromium (Debian's, driven by Playwright): the overview's
numbers are those of `exactlyonce status --json`, a dead letter is opened,
dry-run and replayed (then applied once by the running App), an HTML-bearing
dead letter shows as text, and a request forged by another site changes
nothing. Each page is saved as a screenshot under tests/artifacts/console/.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from exactlyonce import DeadLetter, Message, Retry, logs, migrate
from exactlyonce.cli import main
from exactlyonce.schema import processed
from tests.conftest import drop_all_tables

from .helpers import (
    Proc,
    Rec,
    create_effects,
    create_topic,
    effect_counts,
    engine_for,
    insert_effect,
    make_app,
    process,
    produce,
    read_topic,
    rec,
    running,
    unique,
    wait_all_committed,
)

TOKEN = "browser-console-token-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
#: What the HTML-bearing dead letter carries, in its value, a header and its reason.
VALUE_HTML = '<script>alert("value")</script><img src=x onerror=alert("img")>'
HEADER_HTML = "<svg onload=alert('header')>"
REASON_HTML = "<b>bold-reason</b>"


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


@contextlib.contextmanager
def console_process(tmp_path: Path, database_url: str, bootstrap: str) -> Iterator[tuple[str, Proc]]:
    """`exactlyonce console --port 0` with a token; yields its base URL and the process (stopped after)."""
    argv = [sys.executable, "-m", "exactlyonce", "console", "--port", "0", "--sample-interval", "2",
            "--refresh", "5"]
    with process(argv, tmp_path / "console.log", EXACTLYONCE_DATABASE_URL=database_url,
                 EXACTLYONCE_BOOTSTRAP_SERVERS=bootstrap, EXACTLYONCE_CONSOLE_TOKEN=TOKEN) as proc:
        deadline = time.monotonic() + 30
        while (found := re.search(r"console at (http://127\.0\.0\.1:\d+/)", proc.log_tail())) is None:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the console did not start:\n{proc.log_tail()}")
            time.sleep(0.2)
        yield found[1], proc
        assert proc.terminate() == 0, proc.log_tail()


@contextlib.contextmanager
def other_site(html: str) -> Iterator[str]:
    """A page served from another origin (another port): what an attacker's site would serve."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_console_in_a_browser(
    bootstrap_servers: str, postgres_url: str, chromium: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drop_all_tables(postgres_url)
    engine = engine_for(postgres_url)
    migrate.upgrade(engine)
    create_effects(engine)
    topic = unique("console")
    dlq = f"{topic}.dlq"
    create_topic(bootstrap_servers, topic, 2)
    create_topic(bootstrap_servers, dlq)
    failing = {"dead-1": "bad-data", "html-1": REASON_HTML}
    app = make_app(bootstrap_servers, postgres_url, outbox=False)

    @app.handler(topic, retry=Retry(attempts=1))
    def handle(message: Message, session: Session) -> None:
        message_id = (message.header("message-id") or b"").decode()
        if message_id in failing:
            raise DeadLetter(failing[message_id])
        insert_effect(session, message_id)

    produce(bootstrap_servers, topic, [
        rec("ok-1", partition=0), rec("ok-2", partition=1), rec("ok-1", partition=0), rec("dead-1", partition=1),
        Rec(value=VALUE_HTML.encode(), message_id="html-1", partition=0, headers=(("x-note", HEADER_HTML.encode()),)),
        rec("ok-3", partition=1),
    ])
    with running(app):
        wait_all_committed(bootstrap_servers, app.group_id, topic)
    produce(bootstrap_servers, topic, [rec("late-1", partition=0)])  # a lag of one record
    scope = f"{app.group_id}:{topic}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with console_process(tmp_path, postgres_url, bootstrap_servers) as (base, console):
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        alerts: list[str] = []

        def on_dialog(dialog: Any) -> None:
            # The console's own confirmation is accepted; any other dialog would be injected script.
            if dialog.type == "confirm" and dialog.message.startswith("Replay 1 dead letter(s)"):
                dialog.accept()
            else:
                alerts.append(f"{dialog.type}: {dialog.message}")
                dialog.dismiss()

        page.on("dialog", on_dialog)

        # -- the overview: the numbers of `exactlyonce status --json` -----------
        time.sleep(5)  # a few samples (every 2 s) for the rate and lag charts
        page.goto(base)
        document = cli_json(capsys, "status", "--database-url", postgres_url, "--bootstrap-servers",
                            bootstrap_servers)
        assert page.request.get(base + "api/status").json() == document
        (expected,) = document["scopes"]
        assert (expected["applied"], expected["duplicates"], expected["dead_lettered"], expected["lag"]) == (
            3, 1, 2, 1)
        section = page.locator(f'section.scope[data-scope="{scope}"]')
        for field in ("applied", "duplicates", "skipped", "dead_lettered", "parked", "open_gaps", "lag"):
            assert section.locator(f'td[data-field="{field}"]').first.inner_text() == f"{expected[field]:,}", field
        for p in expected["partitions"]:
            row = section.locator(f'tr[data-partition="{topic}:{p["partition"]}"]')
            assert row.locator('td[data-field="lag"]').inner_text().split()[0] == f"{p['lag']:,}"
        assert section.locator("svg.chart").count() == 3
        assert page.locator(f'tr[data-topic="{dlq}"] td[data-field="records"]').inner_text().startswith("2")
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # Readable without JavaScript too.
        plain = chromium.new_context(java_script_enabled=False)
        plain_page = plain.new_page()
        plain_page.goto(base)
        assert plain_page.locator(f'section.scope[data-scope="{scope}"] td[data-field="applied"]').inner_text() == "3"
        plain_page.goto(f"{base}dlq/{dlq}")
        assert plain_page.locator("table.dead-letters tbody tr").count() == 2
        plain.close()

        # -- dead letters: the topic, the HTML-bearing record as text ---------------
        page.click("header nav >> text=Dead letters")
        page.click(f"a:text-is('{dlq}')")
        page.wait_for_selector("table.dead-letters")
        assert page.locator("table.dead-letters tbody tr").count() == 2
        page.screenshot(path=str(ARTIFACTS / "dead-letters.png"), full_page=True)
        html_row = page.locator('tr[data-message-id="html-1"]')
        assert html_row.locator("td.reason").inner_text() == REASON_HTML
        html_row.locator("td:nth-child(2) a").click()
        assert page.locator('pre[data-field="value"]').inner_text() == VALUE_HTML
        assert page.locator('td[data-field="reason"]').inner_text() == REASON_HTML
        assert HEADER_HTML in page.locator('table.headers').inner_text()
        assert page.locator("main img, main script, main b, main svg[onload]").count() == 0
        assert page.evaluate("document.scripts.length") == 1  # the console's own console.js
        page.screenshot(path=str(ARTIFACTS / "dead-letter-html.png"), full_page=True)

        page.go_back()
        dead_row = page.locator('tr[data-message-id="dead-1"]')
        place = dead_row.get_attribute("data-place")
        dead_row.locator("td:nth-child(2) a").click()
        assert page.locator('td[data-field="reason"]').inner_text() == "bad-data"
        assert page.locator('td[data-field="message-id"]').inner_text() == "dead-1"
        page.screenshot(path=str(ARTIFACTS / "dead-letter.png"), full_page=True)

        # -- the dry run: shows what would happen, sends nothing ----------------------
        page.go_back()
        page.check(f'input[name="at"][value="{place}"]')
        page.click("text=Dry run of a replay of the selected")
        assert page.locator(f'tr[data-place="{place}"]').get_attribute("data-action") == "would-replay"
        assert "Nothing was sent" in page.locator('p[data-summary="dry-run"]').inner_text()
        page.screenshot(path=str(ARTIFACTS / "replay-dry-run.png"), full_page=True)
        size = len(read_topic(bootstrap_servers, topic))

        # -- forged requests: another site's form, and one without the token ---------------
        forged = (f'<form id="f" method="post" action="{base}dlq/{dlq}/replay">'
                  f'<input name="at" value="{place}"><input name="token" value="{TOKEN}"></form>'
                  '<script>document.getElementById("f").submit()</script>')
        attacker = context.new_page()
        with other_site(forged) as evil, attacker.expect_response(lambda r: r.request.method == "POST") as answer:
            attacker.goto(evil)
        assert answer.value.status == 403
        attacker.wait_for_load_state()
        assert "cross-site request refused" in attacker.locator("main").inner_text()
        attacker.screenshot(path=str(ARTIFACTS / "forged-request.png"), full_page=True)
        attacker.close()
        assert page.request.post(f"{base}dlq/{dlq}/replay", form={"at": place}).status in (401, 403)
        assert page.request.post(f"{base}api/dlq/{dlq}/replay", data={"at": [place]}).status == 401
        assert len(read_topic(bootstrap_servers, topic)) == size
        with engine.connect() as conn:
            assert conn.execute(sa.select(processed.c.outcome).where(
                processed.c.message_id == "dead-1")).scalar_one() == "dead_lettered"

        # -- the replay, confirmed with the token, applied once by the running App ----------
        del failing["dead-1"]  # the handler is fixed
        with running(app):
            page.fill('input[name="token"]', TOKEN)
            page.click("button.danger")
            page.wait_for_selector('p[data-summary="replayed"]')
            assert page.locator(f'tr[data-place="{place}"]').get_attribute("data-action") == "replayed"
            page.screenshot(path=str(ARTIFACTS / "replay-done.png"), full_page=True)
            wait_all_committed(bootstrap_servers, app.group_id, topic)
        assert effect_counts(engine) == {"ok-1": 1, "ok-2": 1, "ok-3": 1, "dead-1": 1, "late-1": 1}

        page.click("text=its outcome")
        page.wait_for_selector("table.findings")
        assert page.locator("table.findings tr[data-state]").get_attribute("data-state") == "applied"
        page.screenshot(path=str(ARTIFACTS / "message.png"), full_page=True)
        assert alerts == []
        context.close()
    engine.dispose()
    log_text = console.log_path.read_text()
    assert TOKEN not in log_text
    assert "replayed 1 dead letter(s)" in log_text and "refused POST" in log_text
