"""The console's pages and JSON API (Starlette, Jinja2 templates rendered on the server).

Pages: ``/`` (overview), ``/messages`` (look up a message ID), ``/dlq``
(dead-letter topics), ``/dlq/TOPIC`` (its records, filtered),
``/dlq/TOPIC/record/P/OFFSET`` (one dead letter), ``/dlq/TOPIC/replay``
(GET: the dry run of a replay; POST: the replay). The JSON API under
``/api`` serves the same data; ``GET /api/status`` is the document of
``exactlyonce status --json``.

Escaping: templates autoescape, and every value a template prints first goes
through :func:`exactlyonce.logs.redact` (Jinja's ``finalize``), so a dead
letter's HTML shows as text and a secret in it as ``***``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from exactlyonce import admin, logs
from exactlyonce._duration import parse_time
from exactlyonce.console import charts
from exactlyonce.console.backend import (
    COUNTS,
    RATE_WINDOW,
    Backend,
    Overview,
    ReplayResult,
    Settings,
    Unavailable,
    aware,
    duration,
)
from exactlyonce.console.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    TOKEN_FIELD,
    Csrf,
    SecurityHeaders,
    bearer_token,
    cross_site,
    token_matches,
)
from exactlyonce.errors import ConfigurationError

log = logging.getLogger("exactlyonce.console")

#: Host headers answered by a console listening on loopback (DNS rebinding cannot reach it by another name).
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]
#: The largest request body read (a replay form or JSON).
MAX_BODY = 256 * 1024
#: The most dead letters one replay request may name.
MAX_REPLAY = 1000


def _redact_value(value: Any) -> Any:
    """Jinja's ``finalize``: every printed string is redacted (Markup built by the console is kept)."""
    if isinstance(value, Markup):
        return value
    if isinstance(value, str):
        return logs.redact(value)
    return value


def _when(value: datetime | None) -> str:
    value = aware(value)
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _ago(value: datetime | None, now: datetime) -> str:
    value = aware(value)
    if value is None:
        return "-"
    seconds = int((now - value).total_seconds())
    if seconds < 0:
        return "just now"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def _num(value: int | float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 10 or value == 0 else f"{value:.2f}"
    return f"{value:,}"


def environment() -> jinja2.Environment:
    """The templates' environment: autoescaping everywhere, every value redacted."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("exactlyonce.console", "templates"),
        autoescape=True,
        finalize=_redact_value,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, num=_num, ago=_ago, duration=duration)
    return env


def shown_bytes(data: bytes | None, limit: int) -> dict[str, Any]:
    """How a key or value is displayed: text (UTF-8, replacement characters) or hex, cut at ``limit`` bytes.

    JSON is pretty-printed. The text is redacted here as well as by the
    template, since the JSON API returns it too.
    """
    if data is None:
        return {"size": None, "text": None, "format": "none", "cut": False}
    part = data[:limit]
    cut = len(data) > limit
    try:
        text = part.decode("utf-8")
        fmt = "text"
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(part) - 3:  # a character split by the cut
            text, fmt = part[:exc.start].decode("utf-8", "replace"), "text"
        elif sum(b < 32 and b not in (9, 10, 13) for b in part) > len(part) // 10 or exc.start < len(part) // 2:
            text, fmt = part.hex(" "), "hex"
        else:
            text, fmt = part.decode("utf-8", "replace"), "text"
    if fmt == "text" and not cut:
        with contextlib.suppress(ValueError):
            text, fmt = json.dumps(json.loads(text), indent=2, ensure_ascii=False), "json"
    return {"size": len(data), "text": logs.redact(text), "format": fmt, "cut": cut}


def dead_letter_json(record: admin.DeadLetterRecord, limit: int) -> dict[str, Any]:
    """A dead letter for the API: ``dlq list --json``'s fields, the value shown safely, the headers too."""
    data = record.to_json()
    value = shown_bytes(record.value, limit)
    key = shown_bytes(record.key, limit)
    data.update(
        dlq_topic=record.dlq_topic, key=key["text"], value=value["text"], value_format=value["format"],
        value_size=value["size"], value_cut=value["cut"], meta=record.meta,
        headers=[{"name": name, **shown_bytes(v, limit)} for name, v in record.headers],
    )
    redacted: dict[str, Any] = json.loads(logs.redact(json.dumps(data, ensure_ascii=False, default=str)))
    return redacted


def _json(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON with every secret masked, as the CLI prints it."""
    body = logs.redact(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return Response(body + "\n", status_code=status_code, media_type="application/json", headers=headers)


def _positions(values: list[str]) -> list[tuple[int, int]]:
    if len(values) > MAX_REPLAY:
        raise ConfigurationError(f"at most {MAX_REPLAY} dead letters per replay")
    return [admin.parse_position(v) for v in values]


class Console:
    """The Starlette application and its request handlers."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or Backend(settings)
        self.csrf = Csrf()
        self.templates = Jinja2Templates(env=environment())
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        routes = [
            Route("/", self.overview_page),
            Route("/messages", self.message_page),
            Route("/dlq", self.dlq_index_page),
            Route("/dlq/{topic}", self.dlq_topic_page),
            Route("/dlq/{topic}/record/{partition:int}/{offset:int}", self.dlq_record_page),
            Route("/dlq/{topic}/replay", self.replay_preview_page, methods=["GET"]),
            Route("/dlq/{topic}/replay", self.replay_form, methods=["POST"]),
            Route("/api/status", self.api_status),
            Route("/api/overview", self.api_overview),
            Route("/api/messages/{message_id:path}", self.api_message),
            Route("/api/dlq", self.api_dlq_index),
            Route("/api/dlq/{topic}", self.api_dlq_topic),
            Route("/api/dlq/{topic}/replay", self.api_replay_preview, methods=["GET"]),
            Route("/api/dlq/{topic}/replay", self.api_replay, methods=["POST"]),
            Mount("/static", StaticFiles(packages=[("exactlyonce.console", "static")]), name="static"),
        ]
        middleware = [Middleware(SecurityHeaders)]
        if settings.allowed_hosts is not None:
            middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts)))
        self.app = Starlette(routes=routes, middleware=middleware, lifespan=self._lifespan)
        self.app.state.console = self
        # Links are paths, never absolute URLs built from the request's Host header.
        self.templates.env.globals["url_for"] = lambda name, **params: str(self.app.url_path_for(name, **params))

    # -- lifecycle -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample_loop, name="console-sampler", daemon=True)
        self._sampler.start()
        try:
            yield
        finally:
            self._stop.set()
            self._sampler.join(15)
            self.backend.close()

    def _sample_loop(self) -> None:
        """Sample the counters and lags every ``sample_interval`` seconds, for the rates and charts."""
        while not self._stop.is_set():
            try:
                self.backend.sample()
            except Unavailable as exc:
                log.debug("sample skipped: %s", exc)
            except Exception:
                log.warning("sample failed", exc_info=True)
            self._stop.wait(self.settings.sample_interval)

    # -- rendering -------------------------------------------------------

    def _page(self, request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        """Render a page, with a CSRF token in its forms and cookie (a new one if the cookie's is not genuine)."""
        token = request.cookies.get(CSRF_COOKIE)
        fresh = not self.csrf.genuine(token)
        if fresh:
            token = self.csrf.issue()
        base = {
            "settings": self.settings, "csrf_token": token, "csrf_field": CSRF_FIELD, "token_field": TOKEN_FIELD,
            "now": self.backend.clock(), "page": name.removesuffix(".html"), "refresh": None,
            "rate_window": RATE_WINDOW,
        }
        response = self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
        if fresh:
            response.set_cookie(CSRF_COOKIE, token or "", httponly=True, samesite="strict", path="/")
        return response

    def _refused(self, request: Request, status_code: int, why: str, *, api: bool) -> Response:
        log.warning("console: refused %s %s from %s (%d): %s", request.method, request.url.path,
                    request.client.host if request.client else "?", status_code, why)
        if api:
            headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
            return _json({"error": why}, status_code, headers=headers)
        return self._page(request, "error.html", {"title": "Refused", "message": why}, status_code)

    # -- pages -----------------------------------------------------------

    async def overview_page(self, request: Request) -> Response:
        overview = await run_in_threadpool(self.backend.overview)
        return self._page(request, "overview.html", {
            "o": overview, "refresh": self.settings.refresh_seconds, "counts": COUNTS,
            "charts": overview_charts(overview), "scope_reasons": scope_reasons(overview),
        })

    async def message_page(self, request: Request) -> Response:
        message_id = request.query_params.get("id", "").strip()
        scope = request.query_params.get("scope") or None
        findings: list[admin.Finding] | None = None
        error = None
        if message_id:
            try:
                findings = await run_in_threadpool(self.backend.inspect, message_id, scope)
            except Unavailable as exc:
                error = str(exc)
        scopes = await run_in_threadpool(self.backend.scopes)
        return self._page(request, "message.html", {
            "message_id": message_id, "scope": scope, "scopes": scopes, "findings": findings, "error": error,
            "configured": self.settings.dead_letter_topics,
        })

    async def dlq_index_page(self, request: Request) -> Response:
        overview = await run_in_threadpool(self.backend.overview)
        return self._page(request, "dlq_index.html", {"o": overview})

    async def dlq_topic_page(self, request: Request) -> Response:
        topic = request.path_params["topic"]
        view = await run_in_threadpool(self.backend.dead_letters, topic, fresh="reload" in request.query_params)
        filters, problem = dead_letter_filters(request, self.backend.clock())
        shown = [] if problem else admin.select_dead_letters(view.records, **filters)
        shown.reverse()  # newest first
        limit = 160
        previews = {(r.dlq_partition, r.dlq_offset): shown_bytes(r.value, limit) for r in shown}
        return self._page(request, "dlq_topic.html", {
            "view": view, "records": shown, "previews": previews, "problem": problem,
            "reasons": sorted({r.meta.get("reason") or "(none)" for r in view.records}),
            "q": request.query_params, "filters": filters, "topic": topic,
        })

    async def dlq_record_page(self, request: Request) -> Response:
        topic = request.path_params["topic"]
        position = (request.path_params["partition"], request.path_params["offset"])
        error = None
        record = None
        try:
            record = await run_in_threadpool(self.backend.find_dead_letter, topic, position)
        except Unavailable as exc:
            error = str(exc)
        context: dict[str, Any] = {"topic": topic, "position": position, "record": record, "error": error}
        if record is not None:
            limit = self.settings.value_limit
            context.update(
                value=shown_bytes(record.value, limit), key=shown_bytes(record.key, limit),
                headers=[(name, shown_bytes(v, limit)) for name, v in record.headers],
                problem=admin.replay_problem(record),
            )
        status_code = 404 if record is None and error is None else 200
        return self._page(request, "dlq_record.html", context, status_code)

    async def replay_preview_page(self, request: Request) -> Response:
        topic = request.path_params["topic"]
        try:
            positions = _positions(request.query_params.getlist("at"))
        except ConfigurationError as exc:
            return self._page(request, "error.html", {"title": "Bad request", "message": str(exc)}, 400)
        result, error = None, None
        if positions:
            try:
                result = await run_in_threadpool(lambda: self.backend.replay(topic, positions, dry_run=True))
            except Unavailable as exc:
                error = str(exc)
        return self._page(request, "replay.html", {"topic": topic, "result": result, "error": error,
                                                   "positions": positions})

    async def replay_form(self, request: Request) -> Response:
        """The confirmed replay of the dry-run page's form."""
        topic = request.path_params["topic"]
        refusal = self._write_refusal(request)
        if refusal is not None:
            return self._refused(request, *refusal, api=False)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return self._refused(request, 415, "expected a form (application/x-www-form-urlencoded)", api=False)
        try:
            body = await read_body(request)
        except ConfigurationError as exc:
            return self._page(request, "error.html", {"title": "Bad request", "message": str(exc)}, 413)
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if not token_matches(next(iter(form.get(TOKEN_FIELD, [])), None), self.settings.token):
            return self._refused(request, 401, "the console token is missing or wrong", api=False)
        if not self.csrf.verify(request.cookies.get(CSRF_COOKIE), next(iter(form.get(CSRF_FIELD, [])), None)):
            return self._refused(request, 403, "the form's CSRF token is missing or does not match its cookie "
                                 "(reload the page and try again)", api=False)
        try:
            positions = _positions(form.get("at", []))
        except ConfigurationError as exc:
            return self._page(request, "error.html", {"title": "Bad request", "message": str(exc)}, 400)
        result, error = None, None
        try:
            result = await run_in_threadpool(self._replay, request, topic, positions)
        except Unavailable as exc:
            error = str(exc)
        return self._page(request, "replay.html", {"topic": topic, "result": result, "error": error,
                                                   "positions": positions}, 200 if error is None else 503)

    def _replay(self, request: Request, topic: str, positions: list[tuple[int, int]]) -> ReplayResult:
        result = self.backend.replay(topic, positions, dry_run=False)
        replayed = [f"{i.record.dlq_partition}@{i.record.dlq_offset}" for i in result.items if i.action == "replayed"]
        log.warning("console: %s replayed %d dead letter(s) of %s (%s); %d skipped, %d not found",
                    request.client.host if request.client else "?", len(replayed), topic, ", ".join(replayed),
                    sum(i.action == "skipped" for i in result.items), len(result.missing))
        return result

    def _write_refusal(self, request: Request) -> tuple[int, str] | None:
        """Why a state-changing request is refused before its body is read, or ``None``."""
        if not self.settings.writable:
            return 403, "this console is read-only: start it with a token (EXACTLYONCE_CONSOLE_TOKEN) to replay"
        why = cross_site(request)
        if why is not None:
            return 403, f"cross-site request refused ({why})"
        return None

    # -- JSON API --------------------------------------------------------

    async def api_status(self, request: Request) -> Response:
        try:
            result = await run_in_threadpool(self.backend.status)
        except Unavailable as exc:
            return _json({"error": str(exc)}, 503)
        return _json(self.backend.status_document(result))

    async def api_overview(self, request: Request) -> Response:
        overview = await run_in_threadpool(self.backend.overview)
        return _json(overview.to_json(), 200 if overview.status is not None else 503)

    async def api_message(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        try:
            findings = await run_in_threadpool(self.backend.inspect, message_id,
                                               request.query_params.get("scope") or None)
        except Unavailable as exc:
            return _json({"error": str(exc)}, 503)
        return _json({"message_id": message_id, "known": bool(findings),
                      "findings": [f.to_json() for f in findings]}, 200 if findings else 404)

    async def api_dlq_index(self, request: Request) -> Response:
        overview = await run_in_threadpool(self.backend.overview)
        return _json([d.to_json(overview.at) for d in overview.dead_letters])

    async def api_dlq_topic(self, request: Request) -> Response:
        view = await run_in_threadpool(self.backend.dead_letters, request.path_params["topic"],
                                       fresh="reload" in request.query_params)
        if view.error:
            return _json({"error": view.error}, 503)
        if not view.exists:
            return _json({"error": f"topic {view.topic!r} does not exist"}, 404)
        filters, problem = dead_letter_filters(request, self.backend.clock())
        if problem:
            return _json({"error": problem}, 400)
        records = admin.select_dead_letters(view.records, **filters)
        return _json({"dlq_topic": view.topic, "records_read": len(view.records), "truncated": view.truncated,
                      "records": [dead_letter_json(r, self.settings.value_limit) for r in records]})

    async def api_replay_preview(self, request: Request) -> Response:
        try:
            positions = _positions(request.query_params.getlist("at"))
            result = await run_in_threadpool(
                lambda: self.backend.replay(request.path_params["topic"], positions, dry_run=True))
        except ConfigurationError as exc:
            return _json({"error": str(exc)}, 400)
        except Unavailable as exc:
            return _json({"error": str(exc)}, 503)
        return _json(result.to_json())

    async def api_replay(self, request: Request) -> Response:
        """``POST {"at": ["0@17", ...]}`` with ``Authorization: Bearer TOKEN``: replay those dead letters."""
        refusal = self._write_refusal(request)
        if refusal is not None:
            return self._refused(request, *refusal, api=True)
        if not token_matches(bearer_token(request), self.settings.token):
            return self._refused(request, 401, "the console token is missing or wrong (Authorization: Bearer)",
                                 api=True)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self._refused(request, 415, "expected a JSON body (Content-Type: application/json)", api=True)
        try:
            body = json.loads(await read_body(request))
            at = body.get("at") if isinstance(body, dict) else None
            if not isinstance(at, list) or not at or not all(isinstance(a, str) for a in at):
                raise ConfigurationError('expected {"at": ["PARTITION@OFFSET", ...]}')
            positions = _positions(at)
        except (ValueError, ConfigurationError) as exc:
            return _json({"error": str(exc)}, 400)
        try:
            result = await run_in_threadpool(self._replay, request, request.path_params["topic"], positions)
        except Unavailable as exc:
            return _json({"error": str(exc)}, 503)
        return _json(result.to_json())


# -- helpers of the pages ------------------------------------------------------


def overview_charts(o: Overview) -> dict[str, dict[str, Markup]]:
    # The last hour, or less while the console has sampled for less (at least 5 minutes).
    start = max(o.at - RATE_WINDOW, min(o.sampled_since or o.at, o.at - timedelta(minutes=5)))
    end = o.at
    names = {"applied": "applied", "duplicates": "duplicates", "skipped": "skipped",
             "dead_lettered": "dead-lettered"}
    result: dict[str, dict[str, Markup]] = {}
    for scope in o.status.scopes if o.status is not None else []:
        rates = o.rates.get(scope.scope)
        series = [charts.Series(names[n], f"series-{n}", rates.series.get(n, []) if rates else [])
                  for n in COUNTS]
        lines = [charts.Series(f"{topic}[{partition}]", f"series-{i % 8}", points)
                 for i, ((s, topic, partition), points) in enumerate(sorted(o.lag_series.items()))
                 if s == scope.scope][:12]
        bars = [(f"{p.topic}[{p.partition}]", p.lag, (scope.scope, p.topic, p.partition) in o.growing)
                for p in scope.partitions]
        result[scope.scope] = {
            "rates": charts.line_chart(series, start=start, end=end, unit="records per minute",
                                       title=f"{scope.scope}: records per minute"),
            "lag": charts.line_chart(lines, start=start, end=end, unit="lag (records)",
                                     title=f"{scope.scope}: consumer lag per partition"),
            "lag_now": charts.bar_chart(bars, title=f"{scope.scope}: consumer lag per partition now"),
        }
    return result

def scope_reasons(o: Overview) -> dict[str, list[tuple[str, str, int, int]]]:
    """Scope -> [(dead-letter topic, reason, count among the records read, of which in the last hour)]."""
    result: dict[str, list[tuple[str, str, int, int]]] = {}
    for topic in o.dead_letters:
        for scope in topic.scopes:
            recent = topic.reasons(scope, since=o.at - RATE_WINDOW)
            for reason, count in topic.reasons(scope).items():
                result.setdefault(scope, []).append((topic.topic, reason, count, recent.get(reason, 0)))
    return result


def dead_letter_filters(request: Request, now: datetime) -> tuple[dict[str, Any], str | None]:
    """The dead-letter filters of the query string, parsed; and what was wrong with them."""
    q = request.query_params
    filters: dict[str, Any] = {"reasons": [r for r in q.getlist("reason") if r], "ids": [],
                               "since": None, "until": None}
    if q.get("id", "").strip():
        filters["ids"] = [q["id"].strip()]
    problem = None
    for name in ("since", "until"):
        text = q.get(name, "").strip()
        if text:
            try:
                filters[name] = parse_time(text, now=now)
            except ValueError as exc:  # its text says what to type
                problem = str(exc)
    return filters, problem


async def read_body(request: Request) -> bytes:
    """The request's body, refused beyond MAX_BODY bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ConfigurationError("request body too large")
    return body


def create_app(settings: Settings, *, backend: Backend | None = None) -> Starlette:
    """The console as an ASGI application."""
    return Console(settings, backend).app


def allowed_hosts_for(host: str, given: list[str] | None) -> list[str] | None:
    """The Host headers to answer: ``given``; else the loopback names when listening on loopback; else any."""
    if given:
        return given
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return [*LOOPBACK_HOSTS, host]
    return None


__all__ = ["Console", "allowed_hosts_for", "create_app", "dead_letter_json", "shown_bytes"]
