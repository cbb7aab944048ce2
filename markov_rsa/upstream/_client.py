"""The one HTTP client to inference servers: aiohttp, deadlines, size limits, redirects.

Proxies (``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``), TLS with the system store or
``SSL_CERT_FILE``, content decoding, chunking and keep-alive are aiohttp's job. aiohttp rather
than httpx on the ``httpx-aiohttp`` transport: measured here at 32 requests in flight, the httpx
layer costs about as much client CPU per request again as aiohttp itself (1.4 ms against 0.4 ms on
this machine), and every rollout and every relayed request pays it. This module adds what an orchestrator
needs on top: every call leases an upstream from the pool (a connection that could not be opened
moves on to the next one, since nothing reached a server), a total deadline per call plus an idle
timeout between bytes, a cap on the size of a response, redirects followed only to the same origin
with 307/308, and every failure turned into one :class:`BackendError` with its kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from .._errors import BackendError, CallOutcome, ErrorKind, outcome_of
from .._routing import Upstream, UpstreamPool
from .._version import __version__
from ._retry import RETRY_STATUSES, retry_after

logger = logging.getLogger("markov_rsa.upstream")

USER_AGENT = f"markov-rsa/{__version__}"
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""The largest response body read by default: far above any real completion, far below a runaway."""
_MAX_REDIRECTS = 5
_PARSE_IN_THREAD_BYTES = 256 * 1024  # parsing a larger JSON body would hold the event loop too long


_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def error_message(body: Any) -> str:
    """The message of an error body in any of the shapes servers use (OpenAI, SGLang, bare strings)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or json.dumps(err)[:300])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]


def dump_json(value: Any) -> bytes:
    """``value`` as JSON: by orjson (a request body costs microseconds, not tens of them), or by the
    standard library for what orjson refuses (keys that are not strings, integers past 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def load_json(raw: bytes | str) -> Any:
    """``raw`` parsed by orjson, or by the standard library where orjson is stricter (``NaN`` and
    ``Infinity``, which some servers write); raises ``ValueError`` when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


async def parse_json(raw: bytes) -> Any:
    """``raw`` parsed, in a worker thread when it is large; raises ``ValueError`` when it is not JSON."""
    if len(raw) > _PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(load_json, raw)
    return load_json(raw)


def status_error(where: str, status: int, raw: bytes, body: Any, headers: Mapping[str, str] | None = None) -> BackendError:
    """The error of an HTTP error status; retriable for 408, 409, 425, 429 and 5xx."""
    detail = error_message(body) if body is not None else raw[:300].decode(errors="replace").strip() or "no body"
    return BackendError(
        f"{where} returned {status}: {detail}",
        kind=ErrorKind.status,
        status=status,
        retriable=status in RETRY_STATUSES,
        body=body,
        retry_after=retry_after(headers) if headers is not None else None,
    )


def _failure(err: BaseException, where: str) -> BackendError:
    """The :class:`BackendError` of an exception raised by aiohttp (by type, never by message)."""
    if isinstance(err, BackendError):
        return err
    if isinstance(err, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        # The underlying ssl error says what failed; the aiohttp wrapper's text names the address.
        detail = getattr(err, "certificate_error", None) or getattr(err, "os_error", None) or err
        return BackendError(f"{where}: TLS failed: {detail}", kind=ErrorKind.connect)
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return BackendError(f"{where}: connecting timed out", kind=ErrorKind.connect, retriable=True)
    if isinstance(err, (aiohttp.ClientConnectorError, aiohttp.ClientProxyConnectionError,
                        aiohttp.ClientHttpProxyError)):
        return BackendError(f"{where}: cannot connect: {_reason(err)}", kind=ErrorKind.connect, retriable=True)
    if isinstance(err, aiohttp.InvalidURL):
        return BackendError(f"{where}: invalid URL", kind=ErrorKind.connect)
    if isinstance(err, aiohttp.ServerTimeoutError):
        return BackendError(f"{where}: timed out", kind=ErrorKind.timeout, retriable=True)
    return BackendError(f"{where}: the connection failed: {_reason(err)}", kind=ErrorKind.protocol, retriable=True)


def _reason(err: BaseException) -> str:
    if isinstance(err, aiohttp.ClientConnectorError):
        # Its str() names the address; the OS error alone says what went wrong.
        os_error = err.os_error
        if isinstance(os_error.errno, int) and os_error.errno > 0:
            return os.strerror(os_error.errno)  # asyncio's own strerror names the address
        return os_error.strerror or type(os_error).__name__
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


class UpstreamResponse:
    """A response whose head has been read, holding its upstream's lease until closed.

    Read it with :meth:`read` or :meth:`iter_bytes` (decoded, bounded by the deadline, the idle
    timeout and the size cap); close it with :meth:`aclose` or ``async with``. Closing before the
    end drops the connection, which tells the server to stop generating.
    """

    def __init__(self, client: UpstreamClient, upstream: Upstream, response: aiohttp.ClientResponse, where: str,
                 deadline: float, lease: bool) -> None:
        self.upstream = upstream
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers
        self.where = where
        self._client = client
        self._response = response
        self._deadline = deadline
        self._lease = lease
        self._error: BaseException | None = None
        self._complete = False
        self._closed = False

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def _fail(self, err: BackendError) -> BackendError:
        self._error = err
        return err

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The decoded body in pieces as they arrive."""
        client = self._client
        limit = client.max_response_bytes
        declared = self.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit and "content-encoding" not in self.headers:
            raise self._fail(client.too_large(self.where))
        loop = asyncio.get_running_loop()
        content = self._response.content
        size = 0
        while True:
            at = self._deadline
            try:
                # What already arrived is taken without arming a timer (a small answer usually
                # arrives whole with its head); only a wait for more is bounded.
                piece = b"" if content.at_eof() else content.read_nowait()
                if not piece and not content.at_eof():
                    at = min(loop.time() + client.idle_timeout, self._deadline)
                    async with asyncio.timeout_at(at):
                        piece = await content.readany()
            except TimeoutError:
                raise self._fail(client.timed_out(self.where, idle=at < self._deadline)) from None
            except Exception as err:  # noqa: BLE001 - every library failure becomes one BackendError
                raise self._fail(_failure(err, self.where)) from None
            if not piece:
                self._complete = True
                return
            size += len(piece)
            if size > limit:
                raise self._fail(client.too_large(self.where))
            yield piece

    async def read(self) -> bytes:
        """The whole decoded body."""
        return b"".join([piece async for piece in self.iter_bytes()])

    async def aclose(self, error: BaseException | None = None) -> None:
        """Close the response and give the upstream's lease back, recording how the call ended."""
        if self._closed:
            return
        self._closed = True
        error = error or self._error
        if error is None and self.status >= 400:
            outcome = CallOutcome.server_error if self.status >= 500 else CallOutcome.client_error
        else:
            outcome = outcome_of(error)
        try:
            if self._complete:
                self._response.release()  # read to the end: the connection goes back to the pool
            else:
                self._response.close()  # dropped mid-body: the server stops generating
        finally:
            if self._lease:
                self._client.pool.release(self.upstream, outcome, str(error) if error is not None else None)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose(exc)


class UpstreamClient:
    """Calls to the upstreams of a pool over one keep-alive HTTP client (aiohttp).

    ``timeout`` is the total deadline of a call, from sending it to the last byte of its answer;
    ``idle_timeout`` bounds the wait for each next piece of a body once its head has arrived (a
    server answering a long generation sends nothing before its head, so the wait for the head
    is bounded by the deadline alone). Bodies past ``max_response_bytes`` fail with kind
    ``too_large``. Headers carry ``User-Agent: markov-rsa/<version>`` and the upstream key.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 900.0,
        idle_timeout: float | None = None,
        connect_timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_connections: int = 4096,
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.idle_timeout = min(idle_timeout, timeout) if idle_timeout is not None else timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.max_response_bytes = max_response_bytes
        self.max_connections = max_connections
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **auth, **(headers or {})}
        self._http: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str | None, int | None], tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        self._targets: dict[tuple[str, str, str, bool], tuple[URL, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # -- errors ---------------------------------------------------------------------------------

    def too_large(self, where: str) -> BackendError:
        """The error of a body past the size cap."""
        return BackendError(
            f"{where}: the response exceeds the limit of {self.max_response_bytes} bytes (max_response_bytes)",
            kind=ErrorKind.too_large,
        )

    def timed_out(self, where: str, *, idle: bool) -> BackendError:
        """The error of a call past its deadline (or silent past the idle timeout)."""
        if idle:
            return BackendError(f"{where}: no data for {self.idle_timeout:g} s (idle timeout)",
                                kind=ErrorKind.timeout, retriable=True)
        return BackendError(f"{where}: no complete answer within the deadline of {self.timeout:g} s",
                            kind=ErrorKind.timeout, retriable=True)

    # -- plumbing -------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        # Connections belong to the loop that opened them: a client reused under a second
        # asyncio.run gets fresh ones.
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._abandon()
            # The default context reads the system store, or SSL_CERT_FILE / SSL_CERT_DIR when set.
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30.0,
                                             ssl=ssl.create_default_context())
            self._http = aiohttp.ClientSession(
                connector=connector,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                auto_decompress=True,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._proxies = {}
            self._loop = loop
        return self._http

    def _proxy(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        """The proxy for ``url`` from HTTP_PROXY / HTTPS_PROXY / NO_PROXY, looked up once per origin.

        (aiohttp's ``trust_env`` would look it up, and read ``.netrc``, in a thread for every request.)
        """
        origin = (url.scheme, url.host, url.port)
        known = self._proxies.get(origin)
        if known is None:
            try:
                known = get_env_proxy_for_url(url)
            except LookupError:
                known = (None, None)
            self._proxies[origin] = known
        return known

    def _abandon(self) -> None:
        """Drop the connections of an event loop that is gone (nothing can be awaited on it)."""
        session, self._http = self._http, None
        if session is not None:
            connector = session.connector
            session.detach()
            if connector is not None:
                connector._close()  # the synchronous part of close(): its loop cannot run the rest

    def url(self, upstream: Upstream, path: str, *, root: bool = False) -> str:
        """The URL of ``path`` on ``upstream``: under its OpenAI base URL, or under its root (path prefix kept)."""
        return (upstream.root if root else upstream.base_url) + path

    async def _exchange(self, upstream: Upstream, method: str, path: str, content: bytes | None,
                        headers: dict[str, str] | None, root: bool,
                        deadline: float) -> tuple[aiohttp.ClientResponse, str]:
        """Send a request and read the response head, following same-origin 307/308 redirects."""
        http = self._client()
        key = (upstream.base_url, method, path, root)
        known = self._targets.get(key)
        if known is None:
            # Parsed once per route: a relayed request should cost the proxy well under a millisecond.
            target = URL(self.url(upstream, path, root=root), encoded=True)
            known = self._targets[key] = (target, f"{upstream.name}: {method} {target.path}")
        url, where = known
        resent = False
        for _ in range(_MAX_REDIRECTS + 2):
            try:
                async with asyncio.timeout_at(deadline):
                    proxy, proxy_auth = self._proxy(url)
                    response = await http.request(method, url, data=content, headers=headers, allow_redirects=False,
                                                  proxy=proxy, proxy_auth=proxy_auth)
            except TimeoutError:
                raise self.timed_out(where, idle=False) from None
            except Exception as err:  # noqa: BLE001 - every library failure becomes one BackendError
                if not resent and isinstance(err, _STALE_CONNECTION) and not isinstance(err, aiohttp.ClientConnectorError):
                    # A kept-alive connection the server closed just before the request went out
                    # fails at once, before any answer: send it again, once, on a fresh connection.
                    resent = True
                    continue
                raise _failure(err, where) from None
            status = response.status
            if not 300 <= status < 400 or status == 304:
                return response, where
            location = response.headers.get("location")
            response.release()
            target = url.join(URL(location)) if location else None
            if status in (307, 308) and target is not None and _same_origin(target, url):
                url = target
                where = f"{upstream.name}: {method} {url.path}"
                continue
            shown = f"to {location}" if location else "without a Location"
            raise BackendError(
                f"{where}: redirected ({status}) {shown}; only 307/308 redirects within the same origin are followed: "
                "use the final address as the URL",
                kind=ErrorKind.status,
                status=status,
                private=(location,) if location else (),
            )
        raise BackendError(f"{where}: more than {_MAX_REDIRECTS} redirects", kind=ErrorKind.protocol)

    async def open(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        root: bool = False,
        timeout: float | None = None,
        on_failover: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """Send a request to the upstream the pool picks; the response with its head read.

        ``path`` is relative to the upstream's OpenAI base URL, or to its root with ``root``. When no
        connection can be opened, the next upstream is tried at once (``on_failover`` is told),
        until every one was. The response holds the lease: close it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout or self.timeout, self.timeout)
        pool = self.pool
        tried: set[int] = set()
        while True:
            upstream = pool.try_acquire() if not tried else None
            if upstream is None:
                upstream = await pool.acquire(frozenset(tried))
            try:
                response, where = await self._exchange(upstream, method, path, content, headers, root, deadline)
            except BaseException as err:
                pool.release(upstream, outcome_of(err), str(err))
                if isinstance(err, BackendError) and err.kind is ErrorKind.connect and err.retriable:
                    tried.add(pool.index(upstream))
                    if len(tried) < len(pool.upstreams):
                        if on_failover is not None:
                            on_failover()
                        continue
                raise
            return UpstreamResponse(self, upstream, response, where, deadline, lease=True)

    async def request_json(self, method: str, path: str, payload: Any = None, *, root: bool = False,
                           timeout: float | None = None) -> Any:
        """One JSON exchange: the parsed body of a 2xx answer; a :class:`BackendError` otherwise."""
        content = dump_json(payload) if payload is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else None
        response = await self.open(method, path, content=content, headers=headers, root=root, timeout=timeout)
        async with response:
            raw = await response.read()
            try:
                body: Any = await parse_json(raw)
            except ValueError:
                body = None
            if response.status >= 400:
                raise status_error(response.where, response.status, raw, body, response.headers)
            if body is None:
                raise BackendError(f"{response.where}: the answer is not JSON: {raw[:120]!r}",
                                   kind=ErrorKind.protocol, retriable=True)
            return body

    # -- health -----------------------------------------------------------------------------------

    async def probe(self, upstream: Upstream) -> bool:
        """Whether ``upstream`` answers ``/health`` (vLLM, llama.cpp) or ``/v1/models`` (everyone).

        Probes go the same way as every other call (same proxies, TLS, headers), so readiness
        agrees with what requests can reach; they do not count as calls.
        """
        deadline = asyncio.get_running_loop().time() + self.pool.probe_timeout_s
        status = 0
        for path, root in (("/health", True), ("/models", False)):
            try:
                response, where = await self._exchange(upstream, "GET", path, None, None, root, deadline)
            except BackendError as err:
                upstream.last_error = str(err)
                return False
            status = response.status
            response.close()
            if status == 200:
                return True
        upstream.last_error = f"{where} returned {status}"
        return False

    async def check(self) -> list[bool]:
        """Probe every upstream now and update its health; True where it answered."""
        upstreams = self.pool.upstreams
        results = list(await asyncio.gather(*(self.probe(u) for u in upstreams)))
        self.pool.check_results(upstreams, results)
        return results

    async def _probe_loop(self) -> None:
        pool = self.pool
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while True:
            await asyncio.sleep(pool.probe_interval_s)
            try:
                if loop.time() - last_full >= pool.health_interval_s:
                    last_full = loop.time()
                    await self.check()
                    continue
                down = [u for u in pool.upstreams if not u.healthy]
                if down:
                    results = await asyncio.gather(*(self.probe(u) for u in down))
                    pool.check_results(down, results)
            except Exception:  # a probe must never kill the loop that heals the pool
                logger.debug("upstream probe failed", exc_info=True)

    def start(self) -> None:
        """Start the background health checks (needs a running event loop)."""
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_loop(), name="markov-rsa-upstream-probe")

    async def aclose(self) -> None:
        """Stop the health checks and close the connections."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        http = self._http
        if http is not None and self._loop is asyncio.get_running_loop():
            self._http = None
            await http.close()
        else:
            self._abandon()
