"""The relay's client for upstreams: the shared keep-alive pool of ``markov_rsa._transport``, in the relay's terms.

Pass-through is the proxy's hot path: it must add well under a millisecond per request, which a
general HTTP client does not (httpcore's pool scans every connection for every queued request).
This layer only builds the request head, names failures the way routing and the 502/504 mapping
need them, and gives responses a plain ``headers`` dict.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from .._transport import ConnectionPool, Failures, PooledResponse


class UpstreamConnectError(ConnectionError):
    """No connection could be opened: nothing reached the server, so another one may be tried."""


class UpstreamTimeout(TimeoutError):
    """The server did not answer (or stopped sending) within the timeout."""


class UpstreamProtocolError(ConnectionError):
    """The connection broke or the server sent something that is not HTTP/1.1."""


_FAILURES = Failures(
    connect=lambda message, _: UpstreamConnectError(message),
    connect_timeout=lambda message, _: UpstreamConnectError(message),
    write_timeout=lambda message, _: UpstreamTimeout(message),
    read_timeout=lambda message, _: UpstreamTimeout(message),
    broken=lambda message, _: UpstreamProtocolError(message),
    protocol=lambda message, _: UpstreamProtocolError(message),
)


class UpstreamResponse:
    """A response whose head has been read; read the body with :meth:`read` or :meth:`iter_body`.

    The connection goes back to the pool once the body was read to the end, and is closed when the
    response is closed early, which tells the server to stop generating.
    """

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: PooledResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = {
            name.lower().decode("latin-1"): value.decode("latin-1") for name, value in response.raw_headers
        }

    async def read(self) -> bytes:
        """The whole body."""
        return await self._response.read()

    def iter_body(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (chunked encoding removed)."""
        return self._response.__aiter__()

    def close(self) -> None:
        """Drop the connection unless the body was read to the end (then it is already pooled)."""
        self._response.close()


class OriginPool:
    """Keep-alive connections to one ``scheme://host:port``; the most recently used is reused first."""

    def __init__(self, origin: str, *, connect_timeout: float = 10.0, max_idle: int = 256) -> None:
        parts = urlsplit(origin)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:
            self.host_header = f"[{self.host}]:{self.port}"
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._origin = ("https" if self.tls else "http", self.host, self.port)
        self._pool = ConnectionPool(_FAILURES, max_idle_per_origin=max_idle)

    async def request(
        self, method: str, target: str, headers: bytes, body: bytes | None, *, timeout: float
    ) -> UpstreamResponse:
        """Send a request and read the response head.

        ``headers`` is a ready block of ``Name: value\\r\\n`` lines (Host and Content-Length are
        added here). Raises :class:`UpstreamConnectError`, :class:`UpstreamTimeout` or
        :class:`UpstreamProtocolError`.
        """
        payload = body or b""
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Length: {len(payload)}\r\n".encode()
            + headers
            + b"\r\n"
        )
        response = await self._pool.request(
            self._origin,
            method,
            head,
            payload,
            connect_timeout=self.connect_timeout,
            write_timeout=timeout,
            read_timeout=timeout,
        )
        return UpstreamResponse(response)

    async def aclose(self) -> None:
        """Close the idle connections."""
        await self._pool.aclose()
