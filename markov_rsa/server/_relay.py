"""Pass-through: the client's request relayed to an upstream, the answer relayed back as it arrives.

Everything goes through the shared :class:`UpstreamClient` (the same pool, deadlines, size cap,
proxies and TLS as RSA calls). Bodies are relayed decoded (``Content-Encoding`` is the client
library's to undo, so none is forwarded). A 2xx whose body is not JSON (unary) or not an event
stream (streamed) is an upstream failure, answered with an OpenAI-shaped 502.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from .._errors import BackendError
from .._types import Usage
from ..upstream import UpstreamClient, UpstreamResponse, error_message, parse_json
from ._errors import APIError, is_openai_error, upstream_error
from ._metrics import Metrics
from ._responses import ClosingStream

_JSON = "application/json"
_REQUEST_HEADERS = {"Content-Type": _JSON, "Accept": "*/*"}
logger = logging.getLogger("markov_rsa.server")


def api_error(err: BackendError) -> APIError:
    """The client's answer to a failed upstream call (the error's own status, no address in it)."""
    return upstream_error(err, err.private)


class Relay:
    """Forwards requests to the upstream the pool picks.

    The client's body goes upstream as it came; the client's own ``Authorization`` never does (the
    upstream key, if any, is the server's). A connection that could not even be opened moves on to
    the next upstream, since nothing reached a server; anything later is not retried, since
    generation may already have started.
    """

    def __init__(self, client: UpstreamClient, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self._failover = metrics.upstream_retries.labels("passthrough").inc

    async def _open(self, method: str, path: str, content: bytes | None, root: bool) -> UpstreamResponse:
        try:
            return await self.client.open(method, path, content=content, headers=_REQUEST_HEADERS, root=root,
                                          on_failover=self._failover)
        except BackendError as err:
            logger.warning("pass-through: %s", err)
            raise api_error(err) from None

    async def unary(self, method: str, path: str, content: bytes | None, *, count_usage: bool = False,
                    root: bool = False) -> Response:
        """Relay a request whose answer is one body.

        ``path`` is relative to the upstream's OpenAI base URL (``/chat/completions``), or to its
        root with ``root`` (``/tokenize``); either way the upstream's path prefix is kept.
        """
        response = await self._open(method, path, content, root)
        try:
            async with response:
                body = await response.read()
        except BackendError as err:
            logger.warning("pass-through: %s", err)
            raise api_error(err) from None
        status = response.status
        if status >= 400:
            return upstream_failure(status, body, response.upstream.name)
        try:
            parsed = await parse_json(body) if status != 204 else None
        except ValueError:
            logger.warning("pass-through: %s answered %d with a body that is not JSON", response.where, status)
            raise APIError(502, f"{response.upstream.name} answered {status} with a body that is not JSON "
                           f"({response.content_type or 'no content type'})", code="upstream_error") from None
        if count_usage:
            self._count_usage(parsed)
        return Response(body, status, media_type=_JSON)

    def _count_usage(self, body: Any) -> None:
        try:
            usage = Usage.from_dict(body.get("usage"))
        except (ValueError, AttributeError, TypeError):
            return
        if usage.prompt_tokens:
            self.metrics.tokens.labels("passthrough", "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.metrics.tokens.labels("passthrough", "completion").inc(usage.completion_tokens)

    async def stream(
        self, method: str, path: str, content: bytes | None, on_done: Callable[[int], None] | None = None
    ) -> Response:
        """Relay a streamed answer piece by piece as the upstream sends it (SSE and all).

        ``on_done`` gets 200 when the whole stream went through, 499 when the client left early,
        502/504 when the upstream failed mid-stream.
        """
        response = await self._open(method, path, content, False)
        if response.status >= 400 or response.content_type != "text/event-stream":
            try:
                async with response:
                    body = await response.read()
            except BackendError as err:
                raise api_error(err) from None
            if response.status >= 400:
                return upstream_failure(response.status, body, response.upstream.name)
            logger.warning("pass-through: %s answered a stream request with %s", response.where, response.content_type)
            raise APIError(502, f"{response.upstream.name} answered a stream request with "
                           f"{response.content_type or 'no content type'}, not an event stream", code="upstream_error")
        state: dict[str, Any] = {"status": 499, "closed": False, "error": None}

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for piece in response.iter_bytes():
                    yield piece
                state["status"] = 200
            except BackendError as err:
                logger.warning("pass-through: %s", err)
                state["error"] = err
                error = api_error(err)
                state["status"] = error.status
                yield b"data: " + json.dumps(error.payload()).encode() + b"\n\ndata: [DONE]\n\n"

        async def close() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            # Closing the upstream connection when the client left early is what tells the
            # upstream to stop generating.
            await response.aclose(state["error"])
            if on_done is not None:
                on_done(state["status"])

        return ClosingStream(
            relay(),
            close,
            status_code=response.status,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type="text/event-stream",
        )


def upstream_failure(status: int, body: bytes, upstream: str) -> Response:
    """The answer to an upstream error: 4xx stays 4xx (bodies put in OpenAI's shape), 5xx becomes 502."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if status < 500:
        if is_openai_error(parsed):
            return Response(body, status, media_type=_JSON)
        return APIError(status, _message(parsed, body), code=status).response()
    logger.warning("pass-through: %s returned %d: %s", upstream, status, _message(parsed, body))
    message = f"{upstream} returned {status}: {_message(parsed, body)}"
    return APIError(504 if status == 504 else 502, message, code="upstream_timeout" if status == 504 else "upstream_error").response()


def _message(parsed: Any, body: bytes) -> str:
    if isinstance(parsed, dict):
        return error_message(parsed)
    return body[:300].decode(errors="replace") or "no body"
