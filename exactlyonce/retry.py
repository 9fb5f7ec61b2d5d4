"""Retry policies for handlers, built on tenacity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from exactlyonce.errors import ConfigurationError


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """How a failing handler is retried before its message is dead-lettered.

    Each attempt runs in a fresh transaction (the failed one rolled back both
    the handler's writes and the dedup row). Waits grow exponentially from
    ``backoff`` up to ``max_backoff``, with jitter. Only exceptions that are
    instances of ``retry_on`` are retried; any other exception dead-letters
    the message at once. Transient database and broker failures are not
    counted here: they are retried separately, for the app's
    ``transient_retry_budget``.
    """

    attempts: int = 3
    backoff: timedelta = timedelta(milliseconds=100)
    max_backoff: timedelta = timedelta(seconds=5)
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("Retry.attempts must be at least 1")
        if self.backoff < timedelta(0) or self.max_backoff < self.backoff:
            raise ConfigurationError("Retry needs 0 <= backoff <= max_backoff")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise ConfigurationError("Retry.retry_on must hold exception classes")

    def retrying(
        self, *, retryable: Callable[[BaseException], bool], sleep: Callable[[float], None]
    ) -> Retrying:
        """A tenacity ``Retrying`` for this policy (``retryable`` narrows ``retry_on``)."""
        return Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, self.retry_on) and retryable(exc)),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(
                multiplier=self.backoff.total_seconds(),
                max=self.max_backoff.total_seconds(),
                jitter=self.backoff.total_seconds(),
            ),
            sleep=sleep,
            reraise=True,
        )
