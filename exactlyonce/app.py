"""App: the handler registry, its configuration, and ``run()``."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from exactlyonce import _kafka, ids, settings, signing
from exactlyonce._duration import format_duration
from exactlyonce.errors import ConfigurationError
from exactlyonce.handler import Handler, HandlerFunc, OnGap, OnMismatch, SequenceFunc, check_registration
from exactlyonce.metrics import Metrics
from exactlyonce.outbox import RelayThread
from exactlyonce.retry import Retry
from exactlyonce.runtime import Runner
from exactlyonce.settings import BOOTSTRAP_SERVERS_ENV, DATABASE_URL_ENV, KAFKA_CLIENT_ENV
from exactlyonce.storage import engine as _db

if TYPE_CHECKING:
    # Imported only when used: sqlalchemy.ext.asyncio needs greenlet (the async extras).
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "BOOTSTRAP_SERVERS_ENV",
    "DATABASE_URL_ENV",
    "KAFKA_CLIENT_ENV",
    "App",
    "Handler",
    "HandlerFunc",
    "OnGap",
    "OnMismatch",
    "SequenceFunc",
]


class App:
    """An effectively-once Kafka consumer application.

    Register handlers with :meth:`handler`, then call :meth:`run` (or use the
    ``exactlyonce run MODULE:ATTR`` command).

    ``bootstrap_servers`` and ``database_url`` default to the
    ``EXACTLYONCE_BOOTSTRAP_SERVERS`` and ``EXACTLYONCE_DATABASE_URL``
    environment variables, read when they are first needed, so an ``App`` can
    be defined at import time and its handlers unit-tested without either.
    ``consumer_config`` / ``producer_config`` are forwarded to kafka-python's
    ``KafkaConsumer`` / ``KafkaProducer`` (the latter publishes dead letters
    and relays the outbox) over exactlyonce's defaults.

    ``transient_retry_budget`` bounds how long one batch retries a database or
    broker outage before the runner rewinds and polls again.
    ``batch_wait`` is the time bound of a batch: after a poll returns
    records, the runner keeps polling up to this long to fill a handler's
    ``batch_size`` (default 0: handle what each poll returns at once).
    ``outbox``: :meth:`run` also relays what :func:`exactlyonce.publish`
    stored, in a background thread (when the database has the outbox table).

    ``signing_keys`` (``{key id: secret}``, default from
    ``EXACTLYONCE_SIGNING_KEYS``): when set, every record must carry a valid
    HMAC-SHA256 signature by one of these keys; any other record is
    dead-lettered with reason ``bad-signature`` before it is claimed, so it
    never reaches a handler or the dedup table; message IDs and sequence
    numbers are then derived from the signed parts only (the ``message-id``
    header, the key, the value: see :func:`exactlyonce.signing.signed_parts`),
    and ``ids.header(name)`` for another header is refused. ``signing_key``
    (``(key id, secret)``, default from ``EXACTLYONCE_SIGNING_KEY``) signs
    what the app's outbox relay sends.

    ``lock_timeout``: how long a statement of the app's transactions waits
    for a row lock before it fails as a transient error (PostgreSQL
    ``lock_timeout``, MariaDB/MySQL ``innodb_lock_wait_timeout``, SQLite's busy
    timeout); default a tenth of the consumer's ``max_poll_interval_ms``, and
    it must be below that interval. ``idle_in_transaction_timeout``: how long
    a session may sit idle inside a transaction before the server ends it
    (PostgreSQL ``idle_in_transaction_session_timeout``, MariaDB
    ``idle_transaction_timeout``); default ``max_poll_interval_ms``. Together
    they keep a paused worker's locks from stalling the partitions' next
    owners.

    ``batch_lock_timeout`` (PostgreSQL only): how long a statement in a
    transaction of several polled records (any handler's, batch handler or
    not) waits for a row lock; past it the transaction is taken for a lost
    lock conflict and its records are redone in smaller transactions, as
    after a deadlock. Default 200 ms (or ``lock_timeout``, if shorter; equal
    to it, it bounds nothing): PostgreSQL only looks for a deadlock after
    1 s (``deadlock_timeout``), and every worker queued on the rows waits
    that long. A transaction of one polled record waits ``lock_timeout``.
    Refused for other databases (InnoDB finds deadlocks at once; SQLite has
    no row locks) and above ``lock_timeout``.

    ``kafka_client``: the client the worker's consumer runs on:
    ``"kafka-python"`` (default) or ``"confluent"`` (confluent-kafka, on
    librdkafka: the ``exactlyonce[confluent]`` extra; its ``consumer_config``
    takes librdkafka property names, such as ``"session.timeout.ms"``);
    default from ``EXACTLYONCE_KAFKA_CLIENT``. Dead letters and the outbox
    relay are published with kafka-python either way (docs/kafka-clients.md).

    ``metrics``: the app's Prometheus metrics (``exactlyonce run
    --metrics-port`` serves them).

    ``engine``: a SQLAlchemy ``Engine`` the service already configured (pool,
    TLS, events, instrumentation), used instead of one made from
    ``database_url`` (giving both is a ``ConfigurationError``). The app never
    disposes of it. Its connections are not altered: the app works through a
    view of it (``engine.execution_options()``: same pool, same listeners)
    whose transactions set ``lock_timeout`` and
    ``idle_in_transaction_timeout`` for themselves only (PostgreSQL: ``SET
    LOCAL``; MariaDB/MySQL: the session values are set at each transaction's
    start and set back before it ends); ``app.engine`` is that view. A SQLite
    engine must come from ``exactlyonce.storage.engine.create_engine(url,
    lock_timeout=..., **sqlalchemy_kwargs)``, whose ``lock_timeout`` is its
    busy timeout (``App(lock_timeout=...)`` is then refused); an engine in
    ``AUTOCOMMIT`` is refused. See docs/handlers.md, "Bring your own engine".

    ``async_engine``: an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` for
    the ``async def`` handlers, for a service that configures its own (not
    with ``database_url``). The framework uses it and never disposes of it.
    Without it, the async handlers' engine is made from ``database_url`` with
    an async driver (:attr:`async_engine`). docs/handlers.md, "Async
    handlers", says what else to know.
    """

    def __init__(
        self,
        group_id: str,
        bootstrap_servers: str | None = None,
        database_url: str | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        *,
        transient_retry_budget: timedelta = timedelta(seconds=60),
        batch_wait: timedelta = timedelta(0),
        outbox: bool = True,
        signing_keys: Mapping[str, bytes | str] | None = None,
        signing_key: signing.SigningKey | None = None,
        lock_timeout: timedelta | None = None,
        idle_in_transaction_timeout: timedelta | None = None,
        batch_lock_timeout: timedelta | None = None,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        kafka_client: str | None = None,
    ) -> None:
        if not isinstance(group_id, str) or not group_id:
            raise ConfigurationError("group_id must be a non-empty string")
        if engine is not None and database_url is not None:
            raise ConfigurationError("give App either database_url or engine, not both: the engine already "
                                     "says which database it connects to")
        _check_async_engine(async_engine, database_url)
        self.group_id = group_id
        #: The client the worker's consumer runs on (``kafka-python`` or ``confluent``).
        self.kafka_client = _kafka.check_kafka_client(
            settings.argument_or_environment(kafka_client, KAFKA_CLIENT_ENV) or _kafka.DEFAULT_KAFKA_CLIENT)
        self._bootstrap_servers = bootstrap_servers
        self._database_url = database_url
        self.consumer_config: dict[str, Any] = dict(consumer_config or {})
        self.producer_config: dict[str, Any] = dict(producer_config or {})
        self.transient_retry_budget = transient_retry_budget
        if batch_wait < timedelta(0):
            raise ConfigurationError("batch_wait must not be negative")
        self.batch_wait = batch_wait
        self.outbox = outbox
        #: Verification keys; ``None``: records are not authenticated.
        self.signing_keys: dict[str, bytes] | None = _verification_keys(signing_keys)
        self.signing_key: signing.SigningKey | None = signing.resolve_signing_key(signing_key)
        max_poll = timedelta(milliseconds=int(self.consumer_config.get(
            "max.poll.interval.ms" if self.kafka_client == "confluent" else "max_poll_interval_ms",
            _db.DEFAULT_MAX_POLL_INTERVAL / timedelta(milliseconds=1))))
        #: How long a statement waits for a row lock before failing as transient; how long one in a
        #: PostgreSQL transaction of several records waits; how long a session may be idle inside a
        #: transaction before the server ends it.
        self.lock_timeout, self.batch_lock_timeout, self.idle_in_transaction_timeout = _timeouts(
            max_poll, lock_timeout, batch_lock_timeout, idle_in_transaction_timeout)
        self._batch_lock_timeout_given = batch_lock_timeout is not None
        self.metrics = Metrics()
        self._handlers: dict[str, Handler] = {}
        self._engine: Engine | None = None
        #: Whether the engine was given (engine=): then it is the application's, never replaced or disposed.
        self._engine_given = engine is not None
        if engine is not None:
            self._engine = _db.adopt_engine(
                engine, lock_timeout=self.lock_timeout, idle_in_transaction_timeout=self.idle_in_transaction_timeout,
                lock_timeout_given=lock_timeout is not None,
            )
        for given in (engine, async_engine, database_url):
            if given is not None:
                _check_batch_lock_backend(self._batch_lock_timeout_given, given)
        self._async_engine = async_engine
        #: Whether the App made :attr:`async_engine` itself (then each run's event loop disposes of its pool).
        self.owns_async_engine = False
        self._stop = threading.Event()
        #: Records by outcome (``applied``, ``duplicate``, ``skipped``,
        #: ``dead_lettered``, ``parked``, ``fingerprint_mismatch``) and dead
        #: letters by reason (``dead_lettered:<reason>``), counted since the
        #: app was created.
        self.stats: Counter[str] = Counter()

    # -- registration -------------------------------------------------------

    def handler(
        self,
        topic: str,
        *,
        message_id: ids.MessageIdStrategy | None = None,
        name: str | None = None,
        dead_letter_topic: str | None = None,
        retry: Retry | None = None,
        max_value_bytes: int | None = None,
        on_fingerprint_mismatch: OnMismatch | str = OnMismatch.DEAD_LETTER,
        batch: bool = False,
        batch_size: int | None = None,
        sequence: SequenceFunc | None = None,
        gap_timeout: timedelta = timedelta(minutes=5),
        on_gap: OnGap | str = OnGap.WAIT,
        model: type[Any] | None = None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register ``func(message, session)`` for the records of ``topic``.

        - ``message_id``: a callable ``Message -> str``; default
          :func:`exactlyonce.ids.header` (the ``message-id`` header).
        - ``name``: the dedup scope. The default, ``"<group_id>:<topic>"``,
          does not change when the function is renamed or moved; set it
          explicitly to keep dedup history when the group or topic changes.
        - ``dead_letter_topic``: where unprocessable records go; default
          ``"<topic>.dlq"``.
        - ``retry``: a :class:`~exactlyonce.Retry` policy (attempts, backoff,
          which exceptions are retried); default ``Retry()``: 3 attempts.
        - ``max_value_bytes``: larger records are dead-lettered unread.
        - ``on_fingerprint_mismatch``: a known ID with a different payload is
          dead-lettered (default) or skipped.
        - ``batch_size``: up to this many records of a poll are claimed in one
          statement and handled in one transaction (1: a transaction each);
          default 100, and 500 for a batch handler (``batch=True``). If
          the handler fails, the batch is split in halves until the failing
          record is alone, so the handler may run again for records of a
          failed batch (their writes were rolled back).
        - ``batch``: call ``func(messages, session)`` once per transaction
          with the batch's new records (duplicates removed, each partition's
          in order) instead of once per record.
        - ``sequence``: a callable ``Message -> (stream, number)`` that turns
          on in-order delivery per stream (docs/handlers.md, "Sequenced handlers"):
          numbers start at 1; one watermark row per stream replaces the dedup
          row per message; a number at or below the watermark is a duplicate,
          the next number is handled, a later one is parked in the database
          until the numbers before it have been handled. Not with ``batch``.
        - ``gap_timeout`` / ``on_gap``: a stream that has waited longer than
          this for a missing number is reported (log, metric); with
          ``on_gap="dead_letter"`` its parked messages are dead-lettered too.
        - ``model``: a pydantic v2 model (the ``exactlyonce[pydantic]``
          extra) or a dataclass. Each record's value is decoded as JSON and
          validated into it once, before anything is claimed (after the
          signature check, with ``signing_keys``); the handler, ``message_id``
          (:func:`exactlyonce.ids.field`, or any callable) and ``sequence``
          read the result as ``message.payload``, batch handlers too. A value
          that is not JSON is dead-lettered as ``undecodable-value``, one that
          does not validate as ``invalid-payload``, with the failing fields
          (not their values) in ``x-exactlyonce-error-message``
          (docs/handlers.md, "Typed payloads").

        The function is returned unchanged.
        """
        make = check_registration(
            topic,
            group_id=self.group_id,
            registered=self._handlers.values(),
            verifies_signatures=self.signing_keys is not None,
            message_id=message_id,
            name=name,
            dead_letter_topic=dead_letter_topic,
            retry=retry,
            max_value_bytes=max_value_bytes,
            on_fingerprint_mismatch=on_fingerprint_mismatch,
            batch=batch,
            batch_size=batch_size,
            sequence=sequence,
            gap_timeout=gap_timeout,
            on_gap=on_gap,
            model=model,
        )

        def register(func: HandlerFunc) -> HandlerFunc:
            self._handlers[topic] = make(func)
            return func

        return register

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """The registered handlers by topic."""
        return dict(self._handlers)

    # -- configuration ------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """The Kafka bootstrap servers (argument, else environment)."""
        return settings.bootstrap_servers(self._bootstrap_servers)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy database URL (argument, else environment); an app given ``engine=`` has none."""
        if self._engine_given:
            raise ConfigurationError("this App was given its engine (engine=), not a database_url: "
                                     "app.engine.url says where it connects")
        return settings.database_url(self._database_url)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine the app uses: created from ``database_url`` on first use, or the view of ``engine=``.

        The app never disposes of it; dispose of an engine made from
        ``database_url`` yourself when the app is done with it, if the
        process goes on.
        """
        if self._engine is None and self._async_engine is not None and not self.owns_async_engine:
            raise ConfigurationError(
                "this App was given async_engine= and no sync engine: its sync handlers and its outbox "
                "relay (a thread of its own) need one: pass engine= too, or register async def handlers "
                "only and pass outbox=False"
            )
        if self._engine is None:
            _check_batch_lock_backend(self._batch_lock_timeout_given, self.database_url)
            self._engine = _db.create_engine(
                self.database_url,
                lock_timeout=self.lock_timeout,
                idle_in_transaction_timeout=self.idle_in_transaction_timeout,
            )
        return self._engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The async handlers' engine: the one given, else made on first use from :attr:`database_url`.

        Made with :func:`exactlyonce.storage.engine.create_async_engine`: the
        same URL with its async driver (psycopg 3's async mode, asyncmy,
        aiosqlite: the ``*-async`` extras) and the same lock and idle
        timeouts as :attr:`engine`.
        """
        if self._async_engine is None:
            _check_batch_lock_backend(self._batch_lock_timeout_given, self.database_url)
            self._async_engine = _db.create_async_engine(
                self.database_url,
                lock_timeout=self.lock_timeout,
                idle_in_transaction_timeout=self.idle_in_transaction_timeout,
            )
            self.owns_async_engine = True
        return self._async_engine

    # -- running ------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Consume until :meth:`stop` is called (or SIGTERM/SIGINT arrives).

        On stop the message in hand is finished (or rolled back if it is
        waiting out a retry), done offsets are committed, and the consumer
        leaves its group. Unless ``outbox=False``, an outbox relay runs
        alongside, until ``run`` returns.
        """
        if not self._handlers:
            raise ConfigurationError("no handlers registered")
        relay = (
            RelayThread(
                self.engine,
                self.bootstrap_servers,
                self.producer_config,
                signing_key=self.signing_key,
                metrics=self.metrics,
            )
            if self.outbox
            else None
        )
        self._stop.clear()
        previous: dict[signal.Signals, Any] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            if relay is not None:
                relay.start()
            Runner(self, self._stop).run()
        finally:
            if relay is not None:
                relay.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Ask :meth:`run` to finish the message in hand and return (thread-safe)."""
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()


def _verification_keys(given: Mapping[str, bytes | str] | None) -> dict[str, bytes] | None:
    """``signing_keys``, else the environment's (``None``: records are not authenticated), checked."""
    keys = given if given is not None else signing.verification_keys_from_env()
    checked = signing.check_verification_keys(keys) if keys is not None else None
    if checked is not None and not checked:
        raise ConfigurationError("signing_keys is empty: give at least one key, or None to not verify")
    return checked


def _check_async_engine(async_engine: object, database_url: str | None) -> None:
    if async_engine is None:
        return
    if database_url is not None:
        raise ConfigurationError("pass database_url or async_engine, not both: the engine's URL is the database")
    if not isinstance(getattr(async_engine, "sync_engine", None), Engine):
        raise ConfigurationError(
            f"async_engine must be a sqlalchemy.ext.asyncio.AsyncEngine, not {type(async_engine).__name__}"
        )


def _timeouts(
    max_poll: timedelta, lock: timedelta | None, batch_lock: timedelta | None, idle: timedelta | None,
) -> tuple[timedelta, timedelta, timedelta]:
    """``lock_timeout``, ``batch_lock_timeout`` and ``idle_in_transaction_timeout``: checked, defaults filled in."""
    given = {"lock_timeout": lock, "idle_in_transaction_timeout": idle, "batch_lock_timeout": batch_lock}
    for name, value in given.items():
        if value is not None and (not isinstance(value, timedelta) or value <= timedelta(0)):
            raise ConfigurationError(f"{name} must be a positive timedelta")
    lock = lock if lock is not None else max_poll / 10
    if lock >= max_poll:
        raise ConfigurationError(
            f"lock_timeout ({format_duration(lock)}) must be below max_poll_interval_ms "
            f"({format_duration(max_poll)}): a claim waiting longer for a row lock gets its worker evicted "
            "from the group"
        )
    if batch_lock is not None and batch_lock > lock:
        raise ConfigurationError(
            f"batch_lock_timeout ({format_duration(batch_lock)}) must not exceed lock_timeout "
            f"({format_duration(lock)}): it shortens the lock waits of transactions of several records"
        )
    batch_lock = batch_lock if batch_lock is not None else min(_db.DEFAULT_BATCH_LOCK_TIMEOUT, lock)
    return lock, batch_lock, idle if idle is not None else max_poll


def _check_batch_lock_backend(given: bool, database: str | Engine | AsyncEngine) -> None:
    """Refuse a ``batch_lock_timeout`` ``given`` for a database (URL or engine) it does nothing on."""
    if not given:
        return
    backend = _db.normalize_url(database).get_backend_name() if isinstance(database, str) else database.dialect.name
    if backend != "postgresql":
        raise ConfigurationError(
            f"batch_lock_timeout applies to PostgreSQL only, not {backend}: InnoDB finds a deadlock at once "
            "and SQLite has no row locks, so there is no lock wait to shorten; leave it out"
        )
