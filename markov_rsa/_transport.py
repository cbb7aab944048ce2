"""A lean HTTP/1.1 transport for httpx, on asyncio streams.

httpx's default pool (httpcore) spends most of a request's CPU time on bookkeeping: it rescans every
pooled connection, with a socket poll each, whenever a request starts or ends. An orchestrator that
keeps dozens of rollouts in flight and adds a tokenizer call per trace pays that on every call. This
transport keeps idle connections in a per-origin stack and does the minimum per request, while
httpx stays the client API (timeouts, headers, streaming bodies, errors).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import httpx

T = TypeVar("T")
_MAX_HEADER_BYTES = 64 * 1024
_READ_CHUNK = 64 * 1024


class _Connection:
    """One keep-alive connection."""

    __slots__ = ("reader", "writer", "origin")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: tuple[str, str, int]):
        self.reader = reader
        self.writer = writer
        self.origin = origin

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    timeout = request.extensions.get("timeout") or {}
    return timeout.get("connect"), timeout.get("read"), timeout.get("write")


async def _with_timeout(awaitable: Awaitable[T], seconds: float | None, error: type[httpx.TimeoutException],
                        request: httpx.Request) -> T:
    # asyncio.timeout rather than wait_for: wait_for can swallow a cancellation that races with
    # completion, and a lost cancellation here means a request left running on the server.
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise error("timed out", request=request) from None


class _Body(httpx.AsyncByteStream):
    """A response body read as it arrives; hands the connection back when read to the end."""

    def __init__(
        self,
        transport: LeanTransport,
        conn: _Connection,
        request: httpx.Request,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._read_timeout = read_timeout

    async def _read(self, coro: Awaitable[bytes]) -> bytes:
        try:
            return await _with_timeout(coro, self._read_timeout, httpx.ReadTimeout, self._request)
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("peer closed connection mid-body", request=self._request) from None
        except (ConnectionError, OSError) as err:
            raise httpx.ReadError(str(err) or type(err).__name__, request=self._request) from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        reader = conn.reader
        if self._chunked:
            while True:
                size_line = await self._read(reader.readuntil(b"\r\n"))
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("bad chunk size", request=self._request) from None
                if size == 0:
                    # Trailers, if any, end with an empty line.
                    while (await self._read(reader.readuntil(b"\r\n"))) != b"\r\n":
                        pass
                    break
                data = await self._read(reader.readexactly(size + 2))
                yield data[:-2]
        elif self._length is not None:
            remaining = self._length
            while remaining > 0:
                data = await self._read(reader.read(min(remaining, _READ_CHUNK)))
                if not data:
                    raise httpx.RemoteProtocolError("peer closed connection mid-body", request=self._request)
                remaining -= len(data)
                yield data
        else:
            self._keep_alive = False
            while True:
                data = await self._read(reader.read(_READ_CHUNK))
                if not data:
                    break
                yield data
        self._conn = None
        self._transport._release(conn, self._keep_alive)

    async def aclose(self) -> None:
        if self._conn is not None:
            # Not read to the end: the connection's state is unknown, so it is not reused.
            self._conn.close()
            self._conn = None


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive over asyncio streams (https through the ``ssl`` module)."""

    def __init__(self, max_idle_per_origin: int = 256, verify: bool | ssl.SSLContext = True) -> None:
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext | None = verify
        else:
            self._ssl = None
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
        idle = self._idle.setdefault(conn.origin, deque())
        if keep_alive and not self._closed and len(idle) < self._max_idle and not conn.reader.at_eof():
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, request: httpx.Request, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        connect_timeout, _, _ = _timeouts(request)
        try:
            reader, writer = await _with_timeout(
                asyncio.open_connection(host, port, ssl=self._ssl_context() if scheme == "https" else None,
                                        limit=_MAX_HEADER_BYTES * 4),
                connect_timeout,
                httpx.ConnectTimeout,
                request,
            )
        except (OSError, ssl.SSLError) as err:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {err}", request=request) from None
        return _Connection(reader, writer, origin)

    def _head(self, request: httpx.Request, body: bytes) -> bytes:
        url = request.url
        target = url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1"]
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
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport is closed", request=request)
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        payload = self._head(request, body)
        _, read_timeout, write_timeout = _timeouts(request)
        idle = self._idle.get(origin)
        while True:
            reused = bool(idle)
            conn = idle.pop() if idle else await self._connect(request, origin)
            try:
                conn.writer.write(payload)
                await _with_timeout(conn.writer.drain(), write_timeout, httpx.WriteTimeout, request)
                head = await _with_timeout(
                    conn.reader.readuntil(b"\r\n\r\n"), read_timeout, httpx.ReadTimeout, request
                )
                break
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as err:
                conn.close()
                if reused:
                    # The server closed an idle connection before we used it: try a fresh one.
                    idle = self._idle.get(origin)
                    continue
                if isinstance(err, asyncio.IncompleteReadError):
                    raise httpx.RemoteProtocolError("server closed the connection without a response",
                                                    request=request) from None
                raise httpx.ReadError(str(err) or type(err).__name__, request=request) from None
            except asyncio.LimitOverrunError:
                conn.close()
                raise httpx.RemoteProtocolError("response headers too large", request=request) from None
            except BaseException:
                conn.close()
                raise
        status, headers, length, chunked, keep_alive = self._parse_head(head, request)
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        stream = _Body(self, conn, request, length, chunked, keep_alive, read_timeout)
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})

    @staticmethod
    def _parse_head(
        head: bytes, request: httpx.Request
    ) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool]:
        lines = head[:-4].split(b"\r\n")
        try:
            version, code = lines[0].split(b" ", 2)[:2]
            status = int(code)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}", request=request) from None
        headers = []
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                keep_alive = value.lower() != b"close"
        if chunked:
            length = None
        return status, headers, length, chunked, keep_alive

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
