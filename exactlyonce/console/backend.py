"""What the console shows, read through :mod:`exactlyonce.admin` (the layer the CLI uses).

Nothing here renders HTML: :mod:`exactlyonce.console.web` turns these
dataclasses into pages and JSON. Every read catches the failure of the
service behind it (database, broker) and returns what it could read with a
sentence saying what is unavailable, so a page never fails for an outage.

The rates and the lag history come from samples of the exact counters of
``exactlyonce status`` taken while the console runs (a background thread,
and each overview): the counters are kept in the transactions that make the
decisions, for every kind of handler, sequenced ones included.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from exactlyonce import _db, admin, logs
from exactlyonce.errors import ConfigurationError, ExactlyOnceError

log = logging.getLogger("exactlyonce.console")

#: The counts whose rates the overview shows (``exactlyonce_counters`` columns).
COUNTS = ("applied", "duplicates", "skipped", "dead_lettered")
#: How far back the rates and charts look.
RATE_WINDOW = timedelta(hours=1)
#: A partition's lag is "growing" when it rose over this long without ever falling...
GROWTH_WINDOW = timedelta(minutes=5)
#: ... across at least this many samples.
GROWTH_SAMPLES = 3
#: The oldest pending outbox row is a problem when it waited longer than this (is a relay running?).
OUTBOX_STALE = timedelta(minutes=2)
#: A sequenced stream's gap timeout when the App is not given (the handler default).
DEFAULT_GAP_TIMEOUT = timedelta(minutes=5)
#: Each dead-letter topic's newest records are read again after this long.
DEAD_LETTER_TTL_S = 30.0
#: Database connections give up after this long (seconds) instead of hanging a page.
CONNECT_TIMEOUT_S = 5
#: A console token must be at least this long: it is the only thing between a browser and a replay.
MIN_TOKEN_LENGTH = 16


def one_line(exc: BaseException) -> str:
    """An exception as one redacted line (SQLAlchemy appends SQL and a help link)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return logs.redact(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def now_utc() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """Naive UTC (as the tables store it) -> aware UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Settings:
    """How ``exactlyonce console`` was started."""

    database_url: str
    bootstrap_servers: str | None = None
    #: Extra kafka-python settings (TLS, SASL), as ``--kafka-config`` gives them.
    kafka_config: Mapping[str, Any] = field(default_factory=dict)
    #: Replays are allowed to whoever gives it; ``None``: the console is read-only.
    token: str | None = None
    #: Scope -> its handler's dead-letter topic (from ``--app``); other scopes get ``<topic>.dlq``.
    dead_letter_topics: Mapping[str, str] = field(default_factory=dict)
    extra_dead_letter_topics: Sequence[str] = ()
    #: Scope -> its sequenced handler's ``gap_timeout`` (from ``--app``); others get 5 minutes.
    gap_timeouts: Mapping[str, timedelta] = field(default_factory=dict)
    refresh_seconds: int = 15
    sample_interval: float = 30.0
    #: Host headers answered (``None``: any).
    allowed_hosts: Sequence[str] | None = None
    #: The newest this many records of each dead-letter topic are shown.
    dead_letter_window: int = 500
    #: A dead letter's value is shown up to this many bytes.
    value_limit: int = 4096

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigurationError("the console needs a database URL")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the console token must have at least {MIN_TOKEN_LENGTH} characters (it guards replays); "
                "generate one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        if self.token is not None and not self.token.isascii():
            raise ConfigurationError("the console token must be ASCII")
        if self.refresh_seconds < 2:
            raise ConfigurationError("--refresh must be at least 2 seconds")
        if not self.sample_interval >= 1:
            raise ConfigurationError("--sample-interval must be at least 1 second")
        if self.dead_letter_window < 1 or self.value_limit < 64:
            raise ConfigurationError("dead_letter_window must be at least 1 and value_limit at least 64")

    @property
    def writable(self) -> bool:
        """Whether replays are possible at all (a token is configured)."""
        return self.token is not None

    @property
    def database_display(self) -> str:
        """The database URL, password masked."""
        return logs.redact(self.database_url)


# -- samples: rates and lag history ------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The counters and lags of one status read."""

    at: datetime
    #: (scope, count name) -> value.
    counts: Mapping[tuple[str, str], int]
    #: (scope, topic, partition) -> lag (unknown lags are left out).
    lags: Mapping[tuple[str, str, int], int]

    @classmethod
    def of(cls, status: admin.Status, at: datetime) -> Sample:
        counts = {(s.scope, name): s.total(name) for s in status.scopes for name in COUNTS}
        lags = {(s.scope, p.topic, p.partition): p.lag for s in status.scopes for p in s.partitions
                if p.lag is not None}
        return cls(at=at, counts=counts, lags=lags)


@dataclass
class Rate:
    """One count's change over the sampled window."""

    delta: int
    per_minute: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"delta": self.delta, "per_minute": round(self.per_minute, 3)}


@dataclass
class ScopeRates:
    """A scope's counts' rates over the last hour (or since the console's first sample, if later)."""

    since: datetime
    until: datetime
    rates: dict[str, Rate]
    #: count name -> [(time, records per minute between the previous sample and this one)].
    series: dict[str, list[tuple[datetime, float]]]

    @property
    def span(self) -> timedelta:
        return self.until - self.since

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"since": self.since.isoformat(), "until": self.until.isoformat(),
                "window_seconds": self.span.total_seconds(),
                **{name: rate.to_json() for name, rate in self.rates.items()}}


class History:
    """The samples of the last hour, oldest first (thread-safe)."""

    def __init__(self, window: timedelta = RATE_WINDOW) -> None:
        self.window = window
        self._samples: list[Sample] = []
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        with self._lock:
            if self._samples and sample.at <= self._samples[-1].at:
                return
            self._samples.append(sample)
            horizon = sample.at - self.window - timedelta(minutes=1)
            while len(self._samples) > 2 and self._samples[0].at < horizon:
                self._samples.pop(0)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def latest_at(self) -> datetime | None:
        with self._lock:
            return self._samples[-1].at if self._samples else None

    def rates(self, now: datetime) -> dict[str, ScopeRates]:
        """Per scope, each count's change between the oldest sample of the window and the newest one.

        A scope needs two samples; a count that went down (the counters
        table was emptied) has no rate.
        """
        samples = [s for s in self.samples() if s.at >= now - self.window]
        if len(samples) < 2:
            return {}
        scopes = sorted({scope for s in samples for scope, _ in s.counts})
        result: dict[str, ScopeRates] = {}
        for scope in scopes:
            having = [s for s in samples if (scope, COUNTS[0]) in s.counts]
            if len(having) < 2:
                continue
            first, last = having[0], having[-1]
            minutes = (last.at - first.at).total_seconds() / 60
            rates: dict[str, Rate] = {}
            series: dict[str, list[tuple[datetime, float]]] = {}
            for name in COUNTS:
                delta = last.counts[(scope, name)] - first.counts[(scope, name)]
                if delta >= 0 and minutes > 0:
                    rates[name] = Rate(delta=delta, per_minute=delta / minutes)
                points = []
                for before, after in itertools.pairwise(having):
                    step = after.counts[(scope, name)] - before.counts[(scope, name)]
                    span = (after.at - before.at).total_seconds() / 60
                    if step >= 0 and span > 0:
                        points.append((after.at, step / span))
                series[name] = points
            result[scope] = ScopeRates(since=first.at, until=last.at, rates=rates, series=series)
        return result

    def lag_series(self, now: datetime) -> dict[tuple[str, str, int], list[tuple[datetime, int]]]:
        """Each partition's lag over the window."""
        series: dict[tuple[str, str, int], list[tuple[datetime, int]]] = {}
        for sample in self.samples():
            if sample.at < now - self.window:
                continue
            for key, lag in sample.lags.items():
                series.setdefault(key, []).append((sample.at, lag))
        return series

    def growing(self, now: datetime) -> dict[tuple[str, str, int], tuple[int, int]]:
        """The partitions whose lag rose over :data:`GROWTH_WINDOW` without falling: key -> (from, to)."""
        found = {}
        for key, points in self.lag_series(now).items():
            recent = [lag for at, lag in points if at >= now - GROWTH_WINDOW]
            if len(recent) >= GROWTH_SAMPLES and recent[-1] > recent[0] and all(
                    b >= a for a, b in itertools.pairwise(recent)):
                found[key] = (recent[0], recent[-1])
        return found


# -- what the pages show -----------------------------------------------------


@dataclass
class Problem:
    """Something an operator should look at."""

    #: ``error`` (something is stuck or unavailable) or ``warning``.
    severity: str
    kind: str
    text: str
    scope: str | None = None
    #: A page of the console with more about it.
    link: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"severity": self.severity, "kind": self.kind, "text": self.text, "scope": self.scope}


@dataclass
class DeadLetterTopic:
    """The newest records of one dead-letter topic (as far as they could be read)."""

    topic: str
    #: The scopes known to dead-letter there.
    scopes: list[str]
    records: list[admin.DeadLetterRecord] = field(default_factory=list)
    exists: bool = True
    #: Why the topic could not be read.
    error: str | None = None
    read_at: datetime | None = None
    window: int = 0

    @property
    def truncated(self) -> bool:
        """Whether older records were left out (only the newest ``window`` are read)."""
        return len(self.records) >= self.window

    def reasons(self, scope: str | None = None, since: datetime | None = None) -> dict[str, int]:
        """Records per reason (of ``scope``, dead-lettered since ``since``), most frequent first."""
        counts: dict[str, int] = {}
        for record in self.records:
            if scope is not None and record.meta.get("scope") != scope:
                continue
            if since is not None and (record.timestamp is None or record.timestamp < since):
                continue
            reason = record.meta.get("reason") or "(none)"
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def to_json(self, now: datetime) -> dict[str, Any]:
        """A JSON-ready summary (the records themselves: ``GET /api/dlq/TOPIC``)."""
        return {"topic": self.topic, "scopes": self.scopes, "exists": self.exists, "error": self.error,
                "records_read": len(self.records), "truncated": self.truncated,
                "reasons": self.reasons(), "reasons_last_hour": self.reasons(since=now - RATE_WINDOW)}


@dataclass
class Overview:
    """Everything on the overview page."""

    at: datetime
    status: admin.Status | None
    #: What ``exactlyonce status --json`` prints (``None``: the database could not be read).
    document: dict[str, Any] | None
    database_error: str | None
    #: Why the broker could not be read (lag, dead letters); ``None``: it was.
    broker_error: str | None
    rates: dict[str, ScopeRates]
    lag_series: dict[tuple[str, str, int], list[tuple[datetime, int]]]
    growing: dict[tuple[str, str, int], tuple[int, int]]
    dead_letters: list[DeadLetterTopic]
    problems: list[Problem]
    #: When the console's first sample still in the window was taken.
    sampled_since: datetime | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``GET /api/overview``)."""
        return {
            "at": self.at.isoformat(), "status": self.document, "database_error": self.database_error,
            "broker_error": self.broker_error,
            "rates": {scope: r.to_json() for scope, r in self.rates.items()},
            "lag_growing": [{"scope": s, "topic": t, "partition": p, "from": a, "to": b}
                            for (s, t, p), (a, b) in sorted(self.growing.items())],
            "dead_letter_topics": [d.to_json(self.at) for d in self.dead_letters],
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass
class ReplayResult:
    """What a replay (or its dry run) did with the selected dead letters."""

    topic: str
    dry_run: bool
    requested: list[tuple[int, int]]
    items: list[admin.ReplayItem]
    #: Requested positions that hold no record (any more).
    missing: list[tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        """``exactlyonce dlq replay --json``'s document, plus the positions not found."""
        return {"dlq_topic": self.topic, "selected": len(self.items), "items": [i.to_json() for i in self.items],
                "dry_run": self.dry_run, "missing": [f"{p}@{o}" for p, o in self.missing]}


class Unavailable(Exception):
    """A service the request needs cannot be reached; the text says which and why."""


class Backend:
    """The console's reads and its one write (replay), over one engine and short-lived Kafka clients.

    ``reader_factory`` makes the Kafka reader (tests pass a fake);
    ``clock`` gives the current aware UTC time.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reader_factory: Callable[[], admin.KafkaReader] | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.settings = settings
        # Masked in every page, API response and log line, however the console was started.
        logs.register_environment_secrets()
        logs.register_secret(_db.normalize_url(settings.database_url).password)
        logs.register_secret(settings.token)
        for key, value in settings.kafka_config.items():
            if isinstance(value, str) and re.search(r"password|secret", key, re.IGNORECASE):
                logs.register_secret(value)
        self.engine: Engine = _create_engine(settings.database_url)
        self._reader_factory = reader_factory
        self.clock = clock
        self.history = History()
        self._dead_letters: dict[str, tuple[float, DeadLetterTopic]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    @property
    def has_broker(self) -> bool:
        return self._reader_factory is not None or self.settings.bootstrap_servers is not None

    @contextlib.contextmanager
    def reader(self) -> Iterator[admin.KafkaReader | None]:
        """A Kafka reader for one request (``None``: no broker configured), closed after."""
        if self._reader_factory is not None:
            reader = self._reader_factory()
        elif self.settings.bootstrap_servers is not None:
            reader = admin.KafkaReader(self.settings.bootstrap_servers, dict(self.settings.kafka_config))
        else:
            yield None
            return
        try:
            yield reader
        finally:
            with contextlib.suppress(Exception):
                reader.close()

    # -- status ----------------------------------------------------------

    def status(self) -> admin.Status:
        """``admin.status`` with this console's engine and broker; raises :class:`Unavailable`."""
        try:
            with self.reader() as reader:
                return admin.status(self.engine, reader)
        except ConfigurationError as exc:
            raise Unavailable(f"database not ready: {logs.redact(str(exc))}") from exc
        except (sa.exc.SQLAlchemyError, ExactlyOnceError, OSError) as exc:
            raise Unavailable(f"database unavailable: {one_line(exc)}") from exc

    def status_document(self, result: admin.Status) -> dict[str, Any]:
        """The document of ``exactlyonce status --json``."""
        return admin.status_document(result, database_url=self.settings.database_url,
                                     bootstrap_servers=self.settings.bootstrap_servers)

    def sample(self) -> admin.Status:
        """Read the status and keep it as a sample."""
        result = self.status()
        self.history.add(Sample.of(result, self.clock()))
        return result

    def overview(self) -> Overview:
        """The status now, rates and lag over the last hour, dead letters, and the problems among them."""
        now = self.clock()
        status: admin.Status | None = None
        database_error = None
        try:
            status = self.status()
        except Unavailable as exc:
            database_error = str(exc)
        if status is not None:
            latest = self.history.latest_at()
            # Keep samples at least half an interval apart (the overview reloads itself often).
            if latest is None or (now - latest).total_seconds() >= self.settings.sample_interval / 2:
                self.history.add(Sample.of(status, now))
        broker_error = None
        if not self.has_broker:
            broker_error = "no Kafka bootstrap servers given: lag and dead letters unknown"
        elif status is not None and status.lag_error:
            broker_error = status.lag_error
        dead_letters = self._dead_letter_topics(status, broker_error)
        if broker_error is None:
            errors = [d.error for d in dead_letters if d.error]
            if errors and all(d.error for d in dead_letters):
                broker_error = errors[0]
        rates = self.history.rates(now)
        growing = self.history.growing(now)
        samples = [s.at for s in self.history.samples() if s.at >= now - RATE_WINDOW]
        overview = Overview(
            at=now, status=status, document=None if status is None else self.status_document(status),
            database_error=database_error, broker_error=broker_error, rates=rates,
            lag_series=self.history.lag_series(now), growing=growing, dead_letters=dead_letters, problems=[],
            sampled_since=samples[0] if samples else None,
        )
        overview.problems = self._problems(overview)
        return overview

    def _problems(self, o: Overview) -> list[Problem]:
        problems: list[Problem] = []
        if o.database_error:
            problems.append(Problem("error", "database", o.database_error))
        if o.broker_error:
            problems.append(Problem("warning" if not self.has_broker else "error", "broker",
                                    f"broker: {o.broker_error}"))
        if o.status is None:
            return problems
        for (name, topic, partition), (before, after) in sorted(o.growing.items()):
            problems.append(Problem("warning", "lag-growing",
                                    f"{name}: lag of {topic}[{partition}] grew from {before} to {after} over the "
                                    f"last {int(GROWTH_WINDOW.total_seconds() // 60)} minutes", scope=name))
        for scope in o.status.scopes:
            since = aware(scope.oldest_gap_since)
            if since is None:
                continue
            timeout = self.settings.gap_timeouts.get(scope.scope, DEFAULT_GAP_TIMEOUT)
            if o.at - since > timeout:
                problems.append(Problem(
                    "error", "gap-timeout",
                    f"{scope.scope}: {scope.open_gaps} sequenced stream(s) waiting for a missing number, the "
                    f"longest since {since:%Y-%m-%d %H:%M:%S} UTC, past the gap timeout of {duration(timeout)}",
                    scope=scope.scope))
        box = o.status.outbox
        if box is not None and box.refused_count:
            problems.append(Problem(
                "error", "outbox-refused",
                f"outbox: {box.refused_count} row(s) refused by the broker, holding back the later rows of their "
                "keys (fix the cause, then `exactlyonce outbox release ID`)"))
        pending_since = aware(box.oldest_pending_at) if box is not None else None
        if box is not None and pending_since is not None and box.pending > box.refused_count and \
                o.at - pending_since > OUTBOX_STALE:
            problems.append(Problem(
                "warning", "outbox-backlog",
                f"outbox: the oldest of {box.pending} pending row(s) has waited "
                f"{duration(o.at - pending_since)} (is a relay running?)"))
        for name, rates in o.rates.items():
            dead = rates.rates.get("dead_lettered")
            if dead is not None and dead.delta:
                problems.append(Problem("warning", "dead-letters",
                                        f"{name}: {dead.delta} record(s) dead-lettered in the last "
                                        f"{duration(rates.span)}", scope=name))
        return problems

    # -- dead letters ----------------------------------------------------

    def dead_letter_topic_names(self, status: admin.Status | None) -> dict[str, list[str]]:
        """Each dead-letter topic the console knows of -> the scopes that dead-letter there."""
        topics: dict[str, set[str]] = {}
        for name, topic in self.settings.dead_letter_topics.items():
            topics.setdefault(topic, set()).add(name)
        for topic in self.settings.extra_dead_letter_topics:
            topics.setdefault(topic, set())
        for scope in status.scopes if status is not None else ():
            if scope.scope in self.settings.dead_letter_topics:
                continue
            for topic in {p.topic for p in scope.partitions}:
                topics.setdefault(f"{topic}.dlq", set()).add(scope.scope)
        return {topic: sorted(scopes) for topic, scopes in sorted(topics.items())}

    def _dead_letter_topics(self, status: admin.Status | None, broker_error: str | None) -> list[DeadLetterTopic]:
        result = []
        for topic, scopes in self.dead_letter_topic_names(status).items():
            if broker_error is not None:
                result.append(DeadLetterTopic(topic, scopes, error=broker_error, window=0))
            else:
                view = self.dead_letters(topic)
                result.append(DeadLetterTopic(topic, scopes, view.records, view.exists, view.error, view.read_at,
                                              view.window))
        return result

    def dead_letters(self, topic: str, *, fresh: bool = False) -> DeadLetterTopic:
        """The newest records of ``topic`` (cached for :data:`DEAD_LETTER_TTL_S`)."""
        with self._lock:
            cached = self._dead_letters.get(topic)
        if cached is not None and not fresh and time.monotonic() - cached[0] < DEAD_LETTER_TTL_S:
            return cached[1]
        window = self.settings.dead_letter_window
        view = DeadLetterTopic(topic, [], window=window, read_at=self.clock())
        try:
            with self.reader() as reader:
                if reader is None:
                    view.error = "no Kafka bootstrap servers given"
                elif not reader.partitions(topic):
                    view.exists = False
                else:
                    view.records = admin.read_dead_letters(reader, topic, newest=window)
        except ConfigurationError as exc:
            view.error = logs.redact(str(exc))
        except ExactlyOnceError as exc:
            view.error = one_line(exc) if not str(exc) else logs.redact(str(exc))
        with self._lock:
            self._dead_letters[topic] = (time.monotonic(), view)
        return view

    def find_dead_letter(self, topic: str, position: tuple[int, int]) -> admin.DeadLetterRecord | None:
        """The record at ``position`` of ``topic``; raises :class:`Unavailable` if the broker is."""
        try:
            with self.reader() as reader:
                if reader is None:
                    raise Unavailable("no Kafka bootstrap servers given")
                found = admin.read_dead_letters_at(reader, topic, [position])
        except ExactlyOnceError as exc:
            raise Unavailable(f"broker: {logs.redact(str(exc))}") from exc
        return found[0] if found else None

    def replay(self, topic: str, positions: Sequence[tuple[int, int]], *, dry_run: bool) -> ReplayResult:
        """Replay the dead letters at ``positions`` of ``topic`` (``admin.replay_to_topics``), or a dry run.

        The records are read again at their positions, so what is replayed
        is what the broker holds now, not what a page showed earlier.
        """
        wanted = list(dict.fromkeys(positions))
        servers = self.settings.bootstrap_servers
        try:
            with self.reader() as reader:
                if reader is None or (servers is None and not dry_run):
                    raise Unavailable("no Kafka bootstrap servers given")
                records = admin.read_dead_letters_at(reader, topic, wanted)
            selected = admin.select_dead_letters(records, positions=wanted)
            if dry_run:
                items = admin.replay(selected, engine=None, send=None, dry_run=True)
            else:
                assert servers is not None
                items = admin.replay_to_topics(selected, engine=self.engine, bootstrap_servers=servers,
                                               kafka_config=dict(self.settings.kafka_config))
        except ConfigurationError as exc:
            raise Unavailable(logs.redact(str(exc))) from exc
        except sa.exc.SQLAlchemyError as exc:
            raise Unavailable(f"database unavailable: {one_line(exc)}") from exc
        except ExactlyOnceError as exc:
            raise Unavailable(f"broker: {logs.redact(str(exc))}") from exc
        finally:
            if not dry_run:
                with self._lock:
                    self._dead_letters.pop(topic, None)
        found = {(r.dlq_partition, r.dlq_offset) for r in selected}
        return ReplayResult(topic=topic, dry_run=dry_run, requested=wanted, items=items,
                            missing=[p for p in wanted if p not in found])

    # -- messages --------------------------------------------------------

    def inspect(self, message_id: str, scope: str | None) -> list[admin.Finding]:
        """``admin.inspect`` with the App's dead-letter topics; raises :class:`Unavailable`."""
        try:
            return admin.inspect(self.engine, message_id, scope=scope,
                                 dead_letter_topics=self.settings.dead_letter_topics)
        except ConfigurationError as exc:
            raise Unavailable(f"database not ready: {logs.redact(str(exc))}") from exc
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise Unavailable(f"database unavailable: {one_line(exc)}") from exc

    def scopes(self) -> list[str]:
        """The scopes the counters know (empty when the database cannot be read)."""
        try:
            return [s.scope for s in admin.status(self.engine, None).scopes]
        except (sa.exc.SQLAlchemyError, ExactlyOnceError, OSError):
            return []


def _create_engine(url: str) -> Engine:
    """The console's engine: connections give up after :data:`CONNECT_TIMEOUT_S` instead of hanging a page."""
    parsed = _db.normalize_url(url)
    if parsed.get_backend_name() == "postgresql" or parsed.get_backend_name() in ("mysql", "mariadb"):
        return _db.create_engine(parsed, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    return _db.create_engine(parsed)


def duration(value: timedelta) -> str:
    """``value`` in words: 42 s, 17 min, 3 h 5 min, 4 days."""
    seconds = int(value.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"
