"""Exceptions raised by the library. Each carries a one-line message fit for a user."""

from __future__ import annotations


class MarkovRSAError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MarkovRSAError, ValueError):
    """A parameter or setting is invalid; ``param`` names it when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BackendError(MarkovRSAError):
    """A backend call failed for good (after retries where they apply).

    ``status`` is the HTTP status when there was one; ``retriable`` says whether the failure was of a
    kind that retries were allowed for (transport errors, timeouts, 429, 5xx).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retriable: bool = False,
        timeout: bool = False,
        attempts: int = 1,
        body: object | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable
        self.timeout = timeout
        self.attempts = attempts
        self.body = body


class RunError(MarkovRSAError):
    """A run could not go on: too few rollouts of a round survived, or a call failed for a user error."""

    def __init__(self, message: str, failures: list[BackendError] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []
