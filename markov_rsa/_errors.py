"""Exceptions raised by the library. Each carries a one-line message fit for a user."""

from __future__ import annotations

import asyncio
from enum import StrEnum


class MarkovRSAError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MarkovRSAError, ValueError):
    """A parameter or setting is invalid; ``param`` names it when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ErrorKind(StrEnum):
    """How a backend call failed; decides retries, routing outcomes and the status a client sees."""

    connect = "connect"
    """No connection (refused, DNS, TLS, proxy): nothing reached the server."""
    timeout = "timeout"
    """The total deadline or the idle timeout ran out."""
    protocol = "protocol"
    """The connection broke mid-response, or what came back was not a valid answer."""
    status = "status"
    """The server answered with an error status (or a redirect that is not followed)."""
    too_large = "too_large"
    """The response is larger than the configured limit."""


class CallOutcome(StrEnum):
    """How one upstream call ended, for routing and metrics."""

    ok = "ok"
    client_error = "client_error"
    server_error = "server_error"
    timeout = "timeout"
    connect_error = "connect_error"
    protocol_error = "protocol_error"
    too_large = "too_large"
    cancelled = "cancelled"


class BackendError(MarkovRSAError):
    """A backend call failed (after retries where they apply): the one error family of the HTTP layer.

    ``kind`` says how it failed, ``status`` is the HTTP status when there was one, ``retriable``
    whether a retry may help (connection failures, timeouts, broken answers, 408/409/425/429/5xx).
    ``retry_after`` is the wait the server asked for. ``private`` lists parts of the message that
    are addresses (a redirect's ``Location``): the proxy replaces them before a client sees it.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | None = None,
        status: int | None = None,
        retriable: bool = False,
        attempts: int = 1,
        body: object | None = None,
        retry_after: float | None = None,
        private: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind if kind is not None else (ErrorKind.status if status is not None else ErrorKind.protocol)
        self.status = status
        self.retriable = retriable
        self.attempts = attempts
        self.body = body
        self.retry_after = retry_after
        self.private = private

    @property
    def timeout(self) -> bool:
        """Whether the call ran out of time."""
        return self.kind is ErrorKind.timeout

    @property
    def outcome(self) -> CallOutcome:
        """The routing and metrics outcome of a call that failed with this error."""
        if self.kind is ErrorKind.status and self.status is not None:
            return CallOutcome.server_error if self.status >= 500 else CallOutcome.client_error
        return _OUTCOMES[self.kind]

    @property
    def client_status(self) -> int:
        """The HTTP status a proxy client gets: the upstream's own 4xx, 504 for timeouts, else 502."""
        if self.kind is ErrorKind.status and self.status is not None and 400 <= self.status < 500:
            return self.status
        return 504 if self.kind is ErrorKind.timeout else 502


_OUTCOMES = {
    ErrorKind.connect: CallOutcome.connect_error,
    ErrorKind.timeout: CallOutcome.timeout,
    ErrorKind.protocol: CallOutcome.protocol_error,
    ErrorKind.status: CallOutcome.server_error,
    ErrorKind.too_large: CallOutcome.too_large,
}


def outcome_of(err: BaseException | None) -> CallOutcome:
    """The outcome of a call that ended with ``err`` (None: success)."""
    if err is None:
        return CallOutcome.ok
    if isinstance(err, BackendError):
        return err.outcome
    if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
        return CallOutcome.cancelled
    return CallOutcome.server_error


class RunError(MarkovRSAError):
    """A run could not go on: too few rollouts of a round survived, or a call failed for a user error."""

    def __init__(self, message: str, failures: list[BackendError] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []
