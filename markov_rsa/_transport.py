"""A lean keep-alive HTTP/1.1 client on asyncio streams, and the httpx transport built on it.

httpx's default pool (httpcore) spends most of a request's CPU time on bookkeeping: it rescans every
pooled connection, with a socket poll each, whenever a request starts or ends. An orchestrator that
keeps dozens of rollouts in flight, and a proxy whose pass-through must add well under a
millisecond, pay that on every call. :class:`ConnectionPool` does the minimum per request: idle
connections in a per-origin stack, a ready request head written in one go, the response head
parsed, the body read as it arrives (de-chunked). Its two users name failures in their own terms
through :class:`Failures`: :class:`LeanTransport` (httpx's exceptions, for ``OpenAIBackend``) and
the proxy's relay client in ``markov_rsa.server._upstream``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx

Origin = tuple[str, str, int]  # (scheme, host, port)
_LIMIT = 256 * 1024  # the longest response head (and chunk-size line) read
_READ_CHUNK = 64 * 1024
class Failures(NamedTuple):
    """The exceptions a pool raises, each made from a message and the caller's ``ctx``."""

    connect: Callable[[str, Any], Exception]  # no connection (nothing reached the server)
    connect_timeout: Callable[[str, Any], Exception]
    write_timeout: Callable[[str, Any], Exception]
    read_timeout: Callable[[str, Any], Exception]
    broken: Callable[[str, Any], Exception]  # the connection failed after it was opened
    protocol: Callable[[str, Any], Exception]  # the server closed early or sent something not HTTP/1.1


class _Malformed(Exception):
    """Raised inside the body readers; becomes ``Failures.protocol``."""


# Errors inside the body readers that mean the connection, or what came over it, is bad.
_RAW_ERRORS = (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError, _Malformed)


class _Connection:
    """One keep-alive connection."""

    __slots__ = ("loop", "origin", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: Origin) -> None:
        self.reader = reader
        self.writer = writer
        self.origin = origin
        # Streams belong to the loop that opened them: a client reused under a second asyncio.run
        # must not pick them up.
        self.loop = asyncio.get_running_loop()

    @property
    def usable(self) -> bool:
        return (
            self.loop is asyncio.get_running_loop() and not self.writer.is_closing() and not self.reader.at_eof()
        )

    def close(self) -> None:
        if not self.writer.is_closing():
            try:
                self.writer.close()
            except RuntimeError:  # its event loop is already closed; the socket went with it
                pass


async def _exactly(reader: asyncio.StreamReader, size: int, timeout: float | None) -> AsyncIterator[bytes]:
    """``size`` bytes in pieces as they arrive."""
    while size > 0:
        async with asyncio.timeout(timeout):
            data = await reader.read(min(size, _READ_CHUNK))
        if not data:
            raise _Malformed("the server closed the connection before the end of the body")
        size -= len(data)
        yield data


class PooledResponse(httpx.AsyncByteStream):
    """A response whose head has been read; read the body with :meth:`read` or by iterating it.

    The connection goes back to the pool once the body was read to the end, and is closed when the
    response is closed early (which tells the server to stop generating) or when reading fails.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        conn: _Connection,
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        length: int | None,
        chunked: bool,
        keep_alive: bool,
        read_timeout: float | None,
        ctx: Any,
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._read_timeout = read_timeout
        self._ctx = ctx

    def _failure(self, err: BaseException) -> Exception:
        failures, ctx = self._pool.failures, self._ctx
        if isinstance(err, TimeoutError):
            return failures.read_timeout("the server stopped sending within the timeout", ctx)
        if isinstance(err, _Malformed):
            return failures.protocol(str(err), ctx)
        if isinstance(err, EOFError):
            return failures.protocol("the server closed the connection mid-body", ctx)
        if isinstance(err, (ValueError, asyncio.LimitOverrunError)):
            return failures.protocol(f"malformed body framing: {type(err).__name__}", ctx)
        return failures.broken(f"the connection broke mid-body: {type(err).__name__}: {err}", ctx)

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn is None or self._length is None:
            return b"".join([piece async for piece in self])
        try:
            if self._length:
                async with asyncio.timeout(self._read_timeout):
                    body = await conn.reader.readexactly(self._length)
            else:
                body = b""
        except _RAW_ERRORS as err:
            self.close()
            raise self._failure(err) from None
        except BaseException:
            self.close()
            raise
        self._finish()
        return body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (chunked encoding removed)."""
        conn = self._conn
        if conn is None:
            return
        reader, timeout = conn.reader, self._read_timeout
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(timeout):
                        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
                        if size < 0:
                            raise _Malformed("a negative chunk size")
                        if 0 < size <= _READ_CHUNK:
                            # The common case (an SSE event): the chunk and its CRLF in one read.
                            data = await reader.readexactly(size + 2)
                    if size == 0:
                        async with asyncio.timeout(timeout):
                            # Trailers, if any, end with an empty line.
                            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                                pass
                        break
                    if size <= _READ_CHUNK:
                        if data[-2:] != b"\r\n":
                            raise _Malformed("a chunk did not end with CRLF")
                        yield data[:-2]
                        continue
                    async for data in _exactly(reader, size, timeout):
                        yield data
                    async with asyncio.timeout(timeout):
                        if await reader.readexactly(2) != b"\r\n":
                            raise _Malformed("a chunk did not end with CRLF")
            elif self._length is not None:
                async for data in _exactly(reader, self._length, timeout):
                    yield data
            else:
                # No framing: the body ends when the server closes the connection.
                self._keep_alive = False
                while True:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(_READ_CHUNK)
                    if not data:
                        break
                    yield data
        except _RAW_ERRORS as err:
            self.close()
            raise self._failure(err) from None
        except BaseException:  # cancelled, or the consumer stopped early (GeneratorExit)
            self.close()
            raise
        self._finish()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, self._keep_alive)

    def close(self) -> None:
        """Drop the connection unless the body was read to the end (then it is already pooled)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def aclose(self) -> None:
        self.close()


def _parse_head(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool]:
    """Status, headers, content length (None: chunked or until close), chunked, keep-alive."""
    lines = raw[:-4].split(b"\r\n")
    version, code = lines[0].split(b" ", 2)[:2]
    if not version.startswith(b"HTTP/1."):
        raise ValueError("not HTTP/1.x")
    status = int(code)
    headers = []
    length: int | None = None
    chunked = False
    connection = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative content-length")
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            connection = value.lower()
    keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
    return status, headers, None if chunked else length, chunked, keep_alive


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections per origin; the most recently used is reused first."""

    def __init__(self, failures: Failures, *, max_idle_per_origin: int = 256,
                 verify: bool | ssl.SSLContext = True) -> None:
        self.failures = failures
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._ssl = verify if isinstance(verify, ssl.SSLContext) else None
        self._verify = verify
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
            if not self._verify:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        return self._ssl

    def _release(self, conn: _Connection, keep_alive: bool) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if keep_alive and not self._closed and len(idle) < self._max_idle and conn.usable:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, origin: Origin, timeout: float | None, ctx: Any) -> _Connection:
        scheme, host, port = origin
        # asyncio.timeout rather than wait_for: wait_for can swallow a cancellation that races with
        # completion, and a lost cancellation means a request left running on the server.
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._ssl_context() if scheme == "https" else None, limit=_LIMIT
                )
        except (OverflowError, ValueError) as err:  # a port out of range, a malformed host
            raise self.failures.connect(f"cannot connect to {host}:{port}: {err}", ctx) from None
        except OSError as err:  # ssl.SSLError and TimeoutError included
            if deadline.expired():
                raise self.failures.connect_timeout(f"connecting to {host}:{port} timed out", ctx) from None
            raise self.failures.connect(f"cannot connect to {host}:{port}: {err.strerror or err}", ctx) from None
        return _Connection(reader, writer, origin)

    async def request(
        self,
        origin: Origin,
        method: str,
        head: bytes,
        body: bytes,
        *,
        connect_timeout: float | None,
        write_timeout: float | None,
        read_timeout: float | None,
        ctx: Any = None,
    ) -> PooledResponse:
        """Send a request (``head`` is its complete head, blank line included) and read the response head.

        ``ctx`` is handed to the :class:`Failures` factories. A pooled connection that the server
        had closed before the request reached it is replaced by a fresh one, once per stale one.
        """
        failures = self.failures
        if self._closed:
            raise failures.connect("the connection pool is closed", ctx)
        host, port = origin[1], origin[2]
        idle = self._idle.get(origin)
        while True:
            conn: _Connection | None = None
            while idle:
                candidate = idle.pop()
                if candidate.usable:
                    conn = candidate
                    break
                candidate.close()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout, ctx)
            sent = len(body) < _READ_CHUNK
            try:
                if sent:
                    conn.writer.write(head + body)
                else:
                    conn.writer.write(head)
                    conn.writer.write(body)
                    async with asyncio.timeout(write_timeout):
                        await conn.writer.drain()
                    sent = True
                async with asyncio.timeout(read_timeout):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    # Interim 1xx responses (100 Continue, 103 Early Hints) precede the real one.
                    while raw[9:10] == b"1" and raw[9:12] != b"101" and raw.startswith(b"HTTP/1."):
                        raw = await conn.reader.readuntil(b"\r\n\r\n")
                break
            except TimeoutError:
                # Before OSError, of which TimeoutError is a subclass: a slow server is not a stale
                # connection, and the request must not be sent twice.
                conn.close()
                if not sent:
                    raise failures.write_timeout(f"sending to {host}:{port} timed out", ctx) from None
                raise failures.read_timeout(f"{host}:{port} did not answer within {read_timeout} s", ctx) from None
            except asyncio.LimitOverrunError:
                conn.close()
                raise failures.protocol(f"{host}:{port} sent an oversized response head", ctx) from None
            except (asyncio.IncompleteReadError, OSError) as err:
                conn.close()
                if reused and (not isinstance(err, asyncio.IncompleteReadError) or not err.partial):
                    # A pooled connection the server had already closed: the request never reached
                    # it, so it is safe to send again.
                    idle = self._idle.get(origin)
                    continue
                if isinstance(err, asyncio.IncompleteReadError):
                    raise failures.protocol(f"{host}:{port} closed the connection without a response",
                                            ctx) from None
                raise failures.broken(f"connection to {host}:{port} broke: {type(err).__name__}: {err}",
                                      ctx) from None
            except BaseException:
                conn.close()
                raise
        try:
            status, headers, length, chunked, keep_alive = _parse_head(raw)
        except ValueError:
            conn.close()
            raise failures.protocol(f"{host}:{port} sent an invalid response head: {raw[:80]!r}", ctx) from None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        return PooledResponse(self, conn, status, headers, length, chunked, keep_alive, read_timeout, ctx)

    async def aclose(self) -> None:
        """Close the idle connections; later requests fail, connections handed back are closed."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _httpx_error(cls: type[httpx.RequestError]) -> Callable[[str, Any], Exception]:
    return lambda message, request: cls(message, request=request)


HTTPX_FAILURES = Failures(
    connect=_httpx_error(httpx.ConnectError),
    connect_timeout=_httpx_error(httpx.ConnectTimeout),
    write_timeout=_httpx_error(httpx.WriteTimeout),
    read_timeout=_httpx_error(httpx.ReadTimeout),
    broken=_httpx_error(httpx.ReadError),
    protocol=_httpx_error(httpx.RemoteProtocolError),
)


class LeanTransport(httpx.AsyncBaseTransport):
    """An httpx transport over :class:`ConnectionPool` (https through the ``ssl`` module).

    httpx stays the client API (timeouts, headers, streaming bodies); failures are httpx's.
    """

    def __init__(self, max_idle_per_origin: int = 256, verify: bool | ssl.SSLContext = True) -> None:
        self._pool = ConnectionPool(HTTPX_FAILURES, max_idle_per_origin=max_idle_per_origin, verify=verify)

    @staticmethod
    def _head(request: httpx.Request, body: bytes) -> bytes:
        lines = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1"]
        has_length = False
        for name, value in request.headers.multi_items():
            lower = name.lower()
            if lower in ("transfer-encoding", "connection"):
                continue
            if lower == "content-length":
                has_length = True
            lines.append(f"{name}: {value}")
        if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        timeout = request.extensions.get("timeout") or {}
        response = await self._pool.request(
            origin,
            request.method,
            self._head(request, body),
            body,
            connect_timeout=timeout.get("connect"),
            write_timeout=timeout.get("write"),
            read_timeout=timeout.get("read"),
            ctx=request,
        )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=response,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


# -- a plain client over the pool, for callers that need no httpx objects ----------------------------


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
