"""Pass-through: the client's request relayed to an upstream, the answer relayed back as it arrives."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response

from .._http import error_message
from .._routing import Upstream, UpstreamPool
from .._types import Usage
from ._errors import APIError, is_openai_error
from ._metrics import Metrics
from ._responses import ClosingStream
from ._upstream import (
    OriginPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)

_JSON = "application/json"
logger = logging.getLogger("markov_rsa.server")


class Relay:
    """Forwards requests to the upstream the pool picks, over pooled keep-alive connections.

    The client's body goes upstream as it came; the client's own ``Authorization`` never does (the
    upstream key, if any, is the server's). A connection that could not even be opened is retried
    on the next upstream, since nothing reached a server; anything later is not, since generation
    may already have started.
    """

    def __init__(self, pool: UpstreamPool, metrics: Metrics, *, timeout: float, api_key: str | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.timeout = timeout
        headers = "Content-Type: application/json\r\nAccept: */*\r\n"
        if api_key:
            headers += f"Authorization: Bearer {api_key}\r\n"
        self.headers = headers.encode("latin-1")
        self.origins = {u.root: OriginPool(u.root, connect_timeout=min(timeout, 10.0)) for u in pool.upstreams}
        # Request targets: the upstream's base path ("/v1") plus the endpoint.
        self.prefixes = {u.root: urlsplit(u.base_url).path.rstrip("/") for u in pool.upstreams}

    async def aclose(self) -> None:
        """Close the idle connections."""
        for origin in self.origins.values():
            await origin.aclose()

    async def open(self, method: str, path: str, content: bytes | None) -> tuple[UpstreamResponse, Upstream]:
        """Send the request upstream; the response with its head read, and the upstream's lease.

        ``path`` is relative to the upstream's OpenAI base URL (``/chat/completions``), or to its
        root when it starts with ``//`` (``//tokenize``).
        """
        tried: set[int] = set()
        while True:
            upstream = self.pool.try_acquire() if not tried else None
            if upstream is None:
                upstream = await self.pool.acquire(frozenset(tried))
            target = path[1:] if path.startswith("//") else self.prefixes[upstream.root] + path
            try:
                response = await self.origins[upstream.root].request(
                    method, target, self.headers, content, timeout=self.timeout
                )
            except UpstreamConnectError as err:
                logger.warning("pass-through: %s", err)
                self.pool.release(upstream, "connect_error", str(err))
                tried.add(self.pool.index(upstream))
                if len(tried) < len(self.pool.upstreams):
                    self.metrics.upstream_retries.labels("passthrough").inc()
                    continue
                raise APIError(502, "no upstream could be reached", code="upstream_error") from None
            except UpstreamTimeout:
                logger.warning("pass-through: %s timed out", upstream.base_url)
                self.pool.release(upstream, "timeout", "timed out")
                raise _timeout() from None
            except UpstreamProtocolError as err:
                logger.warning("pass-through: %s failed: %s", upstream.base_url, err)
                self.pool.release(upstream, "connect_error", str(err))
                raise APIError(502, "the upstream connection failed", code="upstream_error") from None
            except BaseException:
                self.pool.release(upstream, "cancelled")
                raise
            return response, upstream

    def _outcome(self, status: int) -> str:
        return "ok" if status < 400 else "client_error" if status < 500 else "server_error"

    async def unary(self, method: str, path: str, content: bytes | None, *, count_usage: bool = False) -> Response:
        """Relay a request whose answer is one body."""
        response, upstream = await self.open(method, path, content)
        error: str | None = None
        try:
            body = await response.read()
        except UpstreamTimeout:
            error = "timeout"
            logger.warning("pass-through: %s timed out", upstream.base_url)
            raise _timeout() from None
        except UpstreamProtocolError as err:
            error = "connect_error"
            logger.warning("pass-through: %s failed mid-response: %s", upstream.base_url, err)
            raise APIError(502, "the upstream connection broke mid-response", code="upstream_error") from None
        except BaseException:
            error = "cancelled"
            raise
        finally:
            response.close()
            self.pool.release(upstream, error or self._outcome(response.status))
        status = response.status
        if status >= 400:
            return upstream_failure(status, body, upstream.base_url)
        if count_usage:
            self._count_usage(body)
        return Response(body, status, media_type=response.headers.get("content-type", _JSON))

    def _count_usage(self, body: bytes) -> None:
        try:
            usage = Usage.from_dict(json.loads(body).get("usage"))
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

        ``on_done`` gets 200 when the whole stream went through, 499 when the client left early.
        """
        response, upstream = await self.open(method, path, content)
        if response.status >= 400:
            try:
                body = await response.read()
            except (UpstreamTimeout, UpstreamProtocolError):
                body = b""
            finally:
                response.close()
                self.pool.release(upstream, self._outcome(response.status))
            return upstream_failure(response.status, body, upstream.base_url)
        state = {"outcome": "cancelled", "closed": False}

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.iter_body():
                    yield chunk
                state["outcome"] = "ok"
            except UpstreamTimeout:
                state["outcome"] = "timeout"
                logger.warning("pass-through: %s timed out mid-stream", upstream.base_url)
                yield _stream_error(504, "the upstream timed out mid-stream")
            except UpstreamProtocolError as err:
                state["outcome"] = "connect_error"
                logger.warning("pass-through: %s failed mid-stream: %s", upstream.base_url, err)
                yield _stream_error(502, "the upstream connection broke mid-stream")

        def close() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            # Closing the upstream connection when the client left early is what tells the
            # upstream to stop generating.
            response.close()
            self.pool.release(upstream, str(state["outcome"]))
            if on_done is not None:
                on_done(499 if state["outcome"] == "cancelled" else 200)

        return ClosingStream(
            relay(),
            close,
            status_code=response.status,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=response.headers.get("content-type", "text/event-stream"),
        )


def _stream_error(status: int, message: str) -> bytes:
    code = "upstream_timeout" if status == 504 else "upstream_error"
    error = APIError(status, message, code=code).payload()
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


def _timeout() -> APIError:
    return APIError(504, "the upstream did not answer in time", code="upstream_timeout")


def upstream_failure(status: int, body: bytes, upstream: str) -> Response:
    """The answer to an upstream error: 4xx stays 4xx (bodies put in OpenAI's shape), 5xx becomes 502."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if status < 500:
        if is_openai_error(parsed):
            return Response(body, status, media_type=_JSON)
        message = _message(parsed, body)
        return APIError(status, message, code=status).response()
    logger.warning("pass-through: %s returned %d: %s", upstream, status, _message(parsed, body))
    message = f"the upstream returned {status}: {_message(parsed, body)}"
    return APIError(504 if status == 504 else 502, message, code="upstream_timeout" if status == 504 else "upstream_error").response()


def _message(parsed: Any, body: bytes) -> str:
    if isinstance(parsed, dict):
        return error_message(parsed)
    return body[:300].decode(errors="replace") or "no body"
