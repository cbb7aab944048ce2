"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from starlette.responses import Response

from .._errors import BackendError, RunError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class APIError(Exception):
    """An error the proxy answers with; ``status`` is the HTTP status, ``param`` the offending field."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | int | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")

    def payload(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        """A JSON response carrying this error."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 429:
            headers = {"Retry-After": "1"}
        return Response(json.dumps(self.payload()), self.status, headers=headers, media_type="application/json")


def is_openai_error(body: Any) -> bool:
    """Whether ``body`` already has OpenAI's error shape."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]


def hide_upstreams(message: str, roots: Sequence[str]) -> str:
    """``message`` with the upstreams' addresses replaced: clients learn what failed, not where."""
    for root in roots:
        message = message.replace(root, "upstream")
    return message


def upstream_error(err: BackendError | RunError, hide: Sequence[str] = ()) -> APIError:
    """The answer to a failed upstream call or run: upstream 4xx stays 4xx, timeouts 504, the rest 502.

    The addresses in ``hide`` (the upstream roots) are taken out of the message.
    """
    failures = err.failures if isinstance(err, RunError) else [err]
    message = hide_upstreams(str(err), hide)
    # Each failure knows the status a client should see; a run whose failures disagree is a 502.
    statuses = {f.client_status for f in failures}
    status = statuses.pop() if len(statuses) == 1 else 502
    if status < 500:
        body = failures[0].body
        inner = body.get("error") if isinstance(body, dict) else None
        param = inner.get("param") if isinstance(inner, dict) else None
        return APIError(status, message, param=param if isinstance(param, str) else None, code=status)
    return APIError(status, message, code="upstream_timeout" if status == 504 else "upstream_error")
