"""The session a handler is given, and the call that lends it.

The runner owns the transaction that holds a record's dedup row and the
handler's writes: it commits them together, or rolls them back together.
A handler that ended that transaction itself would split it -- in a batch,
its ``session.commit()`` would also commit the dedup rows of records whose
handlers have not run yet, and those records would then be skipped as
duplicates, never applied. So, while a handler holds it:

- :class:`HandlerSession` refuses ``commit()``, ``rollback()``, ``close()``,
  ``reset()`` and ``invalidate()`` with a :class:`ConfigurationError`,
  before touching anything: the transaction stays whole, and the handler's
  failure follows the ordinary path (rolled back, retried, dead-lettered);
- a COMMIT reaching the connection any other way (``session.connection()
  .commit()``, ``session.get_transaction().commit()``) is refused by an
  engine event before the database sees it, which leaves the transaction
  unusable: it can only roll back;
- when the handler returns, the runner's transaction must still be the
  session's, and active (a rollback through the connection or the
  transaction object is caught here).

A raw ``COMMIT`` statement sent as SQL, and connections the handler opens
itself (``engine.connect()``), are outside what the framework can see.

An ``async def`` handler gets the :class:`~sqlalchemy.ext.asyncio.AsyncSession`
that proxies the same :class:`HandlerSession` (:meth:`HandlerSession.for_async`):
its ``await session.commit()``, ``rollback()`` and ``close()`` run the
refusing methods above, so the same protections hold. :func:`call` awaits it
in place (SQLAlchemy's greenlet bridge): the runner's own work in the
transaction is the same sync code for both kinds of handler.

:func:`call` refuses a *sync* handler that returned an awaitable (a
coroutine function in disguise, such as a sync wrapper of an ``async def``):
nothing of it ran, so it is a configuration error of the worker, raised out
of :meth:`App.run`, not a failure of one record.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import event, util
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from exactlyonce.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

# Await a coroutine from sync code running under greenlet_spawn: ``await_``
# since SQLAlchemy 2.1, ``await_only`` before.
_await: Callable[[Any], Any] = getattr(util, "await_", None) or util.await_only

# Set in a pooled connection's ``info`` while a handler holds the session on it.
_LENT = "exactlyonce.lent_to"

_ADVICE = {
    "commit": "the runner commits the handler's writes together with the message's dedup row; "
              "write through the session and return",
    "rollback": "raise an exception to roll the record back (exactlyonce.Skip records it without "
                "its writes), or use session.begin_nested() for a savepoint of your own",
    "close": "the runner closes the session after the transaction",
    "reset": "the runner closes the session after the transaction",
    "invalidate": "the runner closes the session after the transaction",
}


class Unrunnable(BaseException):
    """Carries a :class:`ConfigurationError` through the runner's retries and dead letters.

    A ``BaseException`` so that no ``except Exception`` on the way treats it
    as a record's failure; the runner raises ``error`` out of ``run()``.
    """

    def __init__(self, error: ConfigurationError) -> None:
        super().__init__(str(error))
        self.error = error


class HandlerSession(Session):
    """A :class:`Session` that a handler may use but not end (see the module docstring)."""

    _lent_to: str | None = None
    #: The AsyncSession that proxies this session, for an async handler (see :meth:`for_async`).
    async_view: AsyncSession | None = None

    def __init__(self, bind: Engine, **kwargs: Any) -> None:
        super().__init__(bind, **kwargs)
        if not event.contains(bind, "commit", _refuse_commit):
            event.listen(bind, "commit", _refuse_commit)

    @classmethod
    def for_async(cls, engine: AsyncEngine) -> HandlerSession:
        """A session on ``engine.sync_engine`` with its :attr:`async_view`, for an async handler.

        The runner uses the session itself (under ``greenlet_spawn``, where its
        blocking calls become awaits); the handler gets ``async_view``, an
        ``AsyncSession`` over the same session and transaction.
        """
        from sqlalchemy.ext.asyncio import AsyncSession  # needs greenlet: the async extras

        view = AsyncSession(engine, sync_session_class=cls)
        session = cast(HandlerSession, view.sync_session)
        session.async_view = view  # the proxy is only weakly registered: keep it alive with its session
        return session

    def _refuse(self, method: str) -> None:
        if self._lent_to is not None:
            raise ConfigurationError(_refusal(self._lent_to, method))

    def commit(self) -> None:
        self._refuse("commit")
        super().commit()

    def rollback(self) -> None:
        self._refuse("rollback")
        super().rollback()

    def close(self) -> None:
        self._refuse("close")
        super().close()

    def reset(self) -> None:
        self._refuse("reset")
        super().reset()

    def invalidate(self) -> None:
        self._refuse("invalidate")
        super().invalidate()

    @contextlib.contextmanager
    def lent(self, scope: str) -> Iterator[None]:
        """Hand the session to ``scope``'s handler for the ``with`` block."""
        root = self.get_transaction()
        connection = self.connection()
        transaction = connection.get_transaction()
        info = connection.info
        self._lent_to = info[_LENT] = scope
        try:
            yield
        finally:
            self._lent_to = None
            info.pop(_LENT, None)
        # Reached only when the handler returned: was the transaction ended behind the session's back?
        if connection.invalidated:
            return  # a lost connection: the runner's commit reports it (a transient error)
        if self.get_transaction() is not root or transaction is None or not transaction.is_active:
            raise ConfigurationError(
                f"the handler for {scope} ended its session's transaction (through the connection or "
                f"the transaction object): {_ADVICE['rollback']}"
            )


def _refusal(scope: str, method: str) -> str:
    return f"the handler for {scope} must not call session.{method}(): {_ADVICE[method]}"


def _refuse_commit(connection: Connection) -> None:
    """An engine ``commit`` event: refuse a COMMIT while a handler holds the connection."""
    try:
        scope = connection.info.get(_LENT)
    except Exception:  # an invalidated connection: SQLAlchemy reports that itself, right after
        return
    if scope is not None:
        # Raising here stops the COMMIT before the database sees it, but
        # SQLAlchemy then takes the transaction for one whose commit failed and
        # would not roll it back when the connection goes back to the pool:
        # roll it back now (nothing of the record may stay).
        connection.engine.dialect.do_rollback(connection.connection)
        raise ConfigurationError(
            f"the handler for {scope} must not commit the session's transaction (through the "
            f"connection or the transaction object): {_ADVICE['commit']}"
        )


def call(
    func: Callable[[Any, Any], Any], arg: Any, session: HandlerSession, scope: str, *, is_async: bool = False,
) -> None:
    """Run ``func(arg, session)`` with ``session`` lent to it.

    ``is_async``: ``func`` is an ``async def`` handler: it gets the session's
    :attr:`~HandlerSession.async_view` and is awaited here (the caller runs
    under ``greenlet_spawn`` on the worker's event loop). A sync handler that
    returns an awaitable is refused.
    """
    if is_async:
        view = session.async_view
        if view is None:  # pragma: no cover - the runner opens async handlers' sessions with for_async
            raise RuntimeError(f"the async handler for {scope} needs a session opened with HandlerSession.for_async")
        with session.lent(scope):
            result = func(arg, view)
            if inspect.isawaitable(result):
                _await(result)
        return
    with session.lent(scope):
        result = func(arg, session)
    if inspect.isawaitable(result) or inspect.isasyncgen(result):
        if inspect.iscoroutine(result):
            result.close()  # never started: closing it avoids "coroutine ... was never awaited"
        raise Unrunnable(ConfigurationError(
            f"the handler for {scope} returned {type(result).__name__} {result!r}, an awaitable, but it was "
            "registered as a sync function (a sync wrapper of an async def?): none of it ran. Register the "
            "async def function itself (exactlyonce awaits it, with an AsyncSession), or a wrapper that is "
            "itself an async def. The record was rolled back and not recorded; the worker stops"
        ))
