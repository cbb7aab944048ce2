"""The retry policy of upstream calls: exponential backoff with jitter, or the wait the server asked for."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from .._errors import BackendError

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
"""Statuses a later attempt may get past: timeouts, conflicts, overload and server errors."""


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait, from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or a date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are tried again, how often, and how long to wait between attempts.

    Only :class:`BackendError` with ``retriable`` set is retried. The wait is the server's
    ``Retry-After`` when it sent one, else exponential backoff with full jitter. A server that asks
    for more than ``max_retry_after`` seconds is taken at its word: the failure is final.
    """

    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0

    def _wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome is not None else None
        asked = err.retry_after if isinstance(err, BackendError) else None
        if asked is not None:
            return asked
        return float(wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_max)(state))

    def _may_retry(self, err: BaseException) -> bool:
        return (
            isinstance(err, BackendError)
            and err.retriable
            and (err.retry_after is None or err.retry_after <= self.max_retry_after)
        )

    def retrying(self, may_retry: Callable[[], bool] = lambda: True) -> AsyncRetrying:
        """A tenacity loop under this policy; ``may_retry`` can veto a retry (e.g. once output was relayed)."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda err: self._may_retry(err) and may_retry()),
            reraise=True,
        )

    async def call(self, call: Callable[[], Awaitable[T]], may_retry: Callable[[], bool] = lambda: True) -> tuple[T, int]:
        """``(result, attempts)`` of ``call`` under this policy; the last :class:`BackendError` carries ``attempts``.

        The first attempt runs before any tenacity machinery is set up (almost every call succeeds
        at once, and a retry loop costs tens of microseconds per call); its failure becomes the
        loop's first attempt, so waits and limits are the loop's alone.
        """
        try:
            return await call(), 1
        except BackendError as err:
            if not (self.max_retries > 0 and self._may_retry(err) and may_retry()):
                err.attempts = 1
                raise
            first: BackendError | None = err
        attempts = 0

        async def attempt_call() -> T:
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return await call()

        try:
            async for attempt in self.retrying(may_retry):
                with attempt:
                    attempts += 1
                    return await attempt_call(), attempts
        except BackendError as err:
            err.attempts = attempts
            raise
        raise BackendError("no attempt was made")  # unreachable: tenacity always makes one
