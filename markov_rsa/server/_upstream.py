"""A lean keep-alive HTTP/1.1 client for relaying requests to upstreams.

Pass-through is the proxy's hot path: it must add well under a millisecond per request. A general
HTTP client spends more than that on bookkeeping (httpcore's pool scans every connection for every
queued request, which grows with the square of the concurrency). This client does the one thing
the relay needs: send a request with a known body over a pooled connection and hand back the
response as it arrives, with the body de-chunked.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_READ_SIZE = 65536


class UpstreamConnectError(ConnectionError):
    """No connection could be opened: nothing reached the server, so another one may be tried."""


class UpstreamTimeout(TimeoutError):
    """The server did not answer (or stopped sending) within the timeout."""


class UpstreamProtocolError(ConnectionError):
    """The connection broke or the server sent something that is not HTTP/1.1."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """A response whose head has been read; read the body with :meth:`read` or :meth:`iter_body`.

    The connection goes back to the pool once the body was read to the end, and is closed when the
    response is closed early, which tells the server to stop generating.
    """

    __slots__ = ("_chunked", "_conn", "_done", "_keep_alive", "_length", "_pool", "_timeout", "headers", "status")

    def __init__(
        self,
        pool: OriginPool,
        conn: _Connection,
        status: int,
        headers: dict[str, str],
        timeout: float,
        http10: bool = False,
    ) -> None:
        self.status = status
        self.headers = headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._timeout = timeout
        length = headers.get("content-length")
        self._length = int(length) if length is not None and length.isdigit() else None
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        connection = headers.get("connection", "").lower()
        self._keep_alive = connection == "keep-alive" if http10 else connection != "close"
        self._done = False

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn is not None and self._length is not None and not self._chunked:
            # The common case (a JSON answer) in one read call.
            try:
                async with asyncio.timeout(self._timeout):
                    body = await conn.reader.readexactly(self._length) if self._length else b""
            except BaseException as err:  # noqa: BLE001 - re-raised, translated; the connection must not be reused
                self.close()
                raise _translate(err) from None
            self._finish()
            return body
        return b"".join([chunk async for chunk in self.iter_body()])

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (chunked encoding removed)."""
        conn = self._conn
        if conn is None or self._done:
            return
        reader = conn.reader
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(self._timeout):
                        line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        async with asyncio.timeout(self._timeout):
                            # Trailers, if any, end with an empty line.
                            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                                pass
                        break
                    while size > 0:
                        async with asyncio.timeout(self._timeout):
                            piece = await reader.read(min(size, _READ_SIZE))
                        if not piece:
                            raise UpstreamProtocolError("connection closed inside a chunk")
                        size -= len(piece)
                        yield piece
                    async with asyncio.timeout(self._timeout):
                        await reader.readexactly(2)
            elif self._length is not None:
                left = self._length
                while left > 0:
                    async with asyncio.timeout(self._timeout):
                        piece = await reader.read(min(left, _READ_SIZE))
                    if not piece:
                        raise UpstreamProtocolError("connection closed before the end of the body")
                    left -= len(piece)
                    yield piece
            else:
                # No framing: the body ends when the server closes the connection.
                self._keep_alive = False
                while True:
                    async with asyncio.timeout(self._timeout):
                        piece = await reader.read(_READ_SIZE)
                    if not piece:
                        break
                    yield piece
        except GeneratorExit:
            self.close()
            raise
        except BaseException as err:  # noqa: BLE001 - re-raised, translated; the connection must not be reused
            self.close()
            raise _translate(err) from None
        self._finish()

    def _finish(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._put_back(conn, self._keep_alive)

    def close(self) -> None:
        """Drop the connection unless the body was read to the end (then it is already pooled)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _translate(err: BaseException) -> BaseException:
    if isinstance(err, (UpstreamTimeout, UpstreamProtocolError, UpstreamConnectError)):
        return err
    if isinstance(err, TimeoutError):
        return UpstreamTimeout("the upstream stopped answering")
    if isinstance(err, (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError)):
        return UpstreamProtocolError(f"{type(err).__name__}: {err}")
    return err


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
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, limit=_READ_SIZE * 4
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as err:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {err.strerror or err}") from None
        return _Connection(reader, writer)

    def _put_back(self, conn: _Connection, keep_alive: bool) -> None:
        if keep_alive and conn.usable and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

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
        while True:
            reused = False
            conn: _Connection | None = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.usable:
                    conn, reused = candidate, True
                    break
                candidate.close()
            if conn is None:
                conn = await self._connect()
            try:
                conn.writer.write(head + payload if len(payload) < _READ_SIZE else head)
                if len(payload) >= _READ_SIZE:
                    conn.writer.write(payload)
                    await conn.writer.drain()
                async with asyncio.timeout(timeout):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                # Before OSError, of which TimeoutError is a subclass: a slow server is not a
                # stale connection, and the request must not be sent twice.
                conn.close()
                raise UpstreamTimeout(f"{self.host}:{self.port} did not answer within {timeout:g} s") from None
            except asyncio.LimitOverrunError:
                conn.close()
                raise UpstreamProtocolError(f"{self.host}:{self.port} sent an oversized response head") from None
            except (asyncio.IncompleteReadError, OSError) as err:
                conn.close()
                if reused and (not isinstance(err, asyncio.IncompleteReadError) or not err.partial):
                    # A pooled connection the server had already closed: the request never
                    # reached it, so it is safe to send again on a fresh one.
                    continue
                raise UpstreamProtocolError(f"connection to {self.host}:{self.port} broke: {type(err).__name__}") from None
            except BaseException:
                conn.close()
                raise
            break
        try:
            status_line, _, rest = raw.partition(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            parsed: dict[str, str] = {}
            for line in rest.split(b"\r\n"):
                if line:
                    name, _, value = line.partition(b":")
                    parsed[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        except (IndexError, ValueError):
            conn.close()
            raise UpstreamProtocolError(f"{self.host}:{self.port} sent an invalid HTTP response") from None
        response = UpstreamResponse(self, conn, status, parsed, timeout, http10=status_line.startswith(b"HTTP/1.0"))
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            response._length = 0
        return response

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
