"""Several upstream servers behind one backend: least-outstanding-requests routing, health checks.

An :class:`UpstreamPool` tracks, for each upstream OpenAI-compatible server, how many requests are in
flight and whether it is healthy. Every call leases the healthy upstream with the fewest requests
outstanding (under a per-upstream cap). An upstream whose connection fails is taken out at once (a
server that refuses connections will not start accepting them by the next request); one that keeps
answering 5xx is taken out after a few in a row. A background probe puts it back as soon as its
``/health`` (or ``/v1/models``) answers again.

:class:`RoutedBackend` is the HTTP backend on top of a pool: each attempt of each rollout goes to
the pool's choice, so a retry after a failure lands on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import BackendError, ConfigError
from ._http import OpenAIBackend, root_url
from ._types import GenerationRequest

logger = logging.getLogger("markov_rsa.routing")

CallObserver = Callable[["Upstream", str], None]
"""Told about every finished upstream call: ``(upstream, outcome)`` with outcome ``ok``, ``client_error``
(4xx), ``server_error`` (5xx), ``timeout``, ``connect_error`` or ``cancelled``."""


@dataclass(eq=False)
class Upstream:
    """One upstream server and what the pool knows about it."""

    base_url: str
    """The OpenAI base URL, e.g. ``http://10.0.0.5:8000/v1``."""
    root: str = ""
    """The server root (``/tokenize`` and ``/health`` live there on vLLM)."""
    outstanding: int = 0
    healthy: bool = True
    consecutive_failures: int = 0
    last_error: str | None = None
    down_since: float | None = None
    calls: int = 0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.root = root_url(self.base_url)

    def to_dict(self) -> dict[str, Any]:
        """State for ``/ready`` and logs."""
        return {
            "url": self.base_url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "calls": self.calls,
            "last_error": self.last_error,
        }


class UpstreamPool:
    """Routes calls over several upstreams by least outstanding requests, skipping unhealthy ones.

    ``per_upstream_concurrency`` caps the requests in flight on each upstream; callers past the cap
    wait for a slot. When every upstream is marked unhealthy, calls go to all of them anyway: a
    request is as good a probe as any, and failing fast with "no upstream" would turn a brief
    outage into lost work.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        per_upstream_concurrency: int = 64,
        failure_threshold: int = 3,
        probe_interval_s: float = 2.0,
        health_interval_s: float = 10.0,
        probe_timeout_s: float = 2.0,
        headers: dict[str, str] | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        if not urls:
            raise ConfigError("at least one upstream URL is needed", param="upstream")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"upstream URL must start with http:// or https://, got {url!r}", param="upstream")
        if per_upstream_concurrency < 1:
            raise ConfigError("upstream concurrency must be at least 1", param="upstream_concurrency")
        self.upstreams = [Upstream(url) for url in dict.fromkeys(u.rstrip("/") for u in urls)]
        self.per_upstream_concurrency = per_upstream_concurrency
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.observer = observer
        self._headers = dict(headers or {})
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._turn = 0
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_client: httpx.AsyncClient | None = None

    # -- leasing ----------------------------------------------------------------------------------

    def _pick(self, exclude: frozenset[int]) -> Upstream | None:
        cap = self.per_upstream_concurrency
        count = len(self.upstreams)
        any_healthy = any(u.healthy for i, u in enumerate(self.upstreams) if i not in exclude)
        best: Upstream | None = None
        # Start the scan at a rotating offset so that ties spread round-robin instead of piling
        # onto the first upstream.
        self._turn = (self._turn + 1) % count
        for step in range(count):
            index = (self._turn + step) % count
            upstream = self.upstreams[index]
            if index in exclude or upstream.outstanding >= cap:
                continue
            if any_healthy and not upstream.healthy:
                continue
            if best is None or upstream.outstanding < best.outstanding:
                best = upstream
        return best

    def try_acquire(self, exclude: frozenset[int] = frozenset()) -> Upstream | None:
        """Lease an upstream at once, or None when every eligible one is at its cap."""
        if self._waiters:
            # Callers already waiting go first.
            return None
        return self._lease(self._pick(exclude))

    @staticmethod
    def _lease(upstream: Upstream | None) -> Upstream | None:
        """Count a call on the picked upstream (the one place leases are booked)."""
        if upstream is not None:
            upstream.outstanding += 1
            upstream.calls += 1
        return upstream

    async def acquire(self, exclude: frozenset[int] = frozenset()) -> Upstream:
        """Lease the healthy upstream with the fewest requests in flight; wait while all are at the cap.

        ``exclude`` holds indexes of upstreams already tried by this call. Every lease must be
        given back with :meth:`release`.
        """
        if len(exclude) >= len(self.upstreams):
            raise BackendError("every upstream was tried and failed", retriable=True)
        upstream = self.try_acquire(exclude)
        if upstream is not None:
            return upstream
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            while True:
                await waiter
                upstream = self._lease(self._pick(exclude))
                if upstream is not None:
                    return upstream
                # The freed slot was on an upstream this call may not use: wait again, first in line.
                waiter = loop.create_future()
                self._waiters.appendleft(waiter)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                # Woken for a free slot it will not use: pass the wake-up on.
                self._wake()
            raise

    def release(self, upstream: Upstream, outcome: str = "ok", error: str | None = None) -> None:
        """Give a lease back and record how the call ended (see :data:`CallObserver`)."""
        upstream.outstanding -= 1
        if outcome == "connect_error":
            self.mark_down(upstream, error or "connection failed")
        elif outcome == "server_error":
            upstream.consecutive_failures += 1
            upstream.last_error = error
            if upstream.consecutive_failures >= self.failure_threshold:
                self.mark_down(upstream, error or "repeated server errors")
        elif outcome in ("ok", "client_error"):
            upstream.consecutive_failures = 0
        if self.observer is not None:
            self.observer(upstream, outcome)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def index(self, upstream: Upstream) -> int:
        """Position of ``upstream`` in the pool, for ``exclude`` sets."""
        return self.upstreams.index(upstream)

    def mark_down(self, upstream: Upstream, error: str) -> None:
        """Take an upstream out of rotation until a probe finds it answering again."""
        upstream.last_error = error
        if upstream.healthy:
            upstream.healthy = False
            upstream.down_since = time.monotonic()

    def mark_up(self, upstream: Upstream) -> None:
        """Put an upstream back into rotation."""
        upstream.healthy = True
        upstream.consecutive_failures = 0
        upstream.down_since = None
        self._wake()

    def for_url(self, url: str) -> tuple[Upstream, str] | None:
        """The upstream whose root ``url`` starts with, and the rest of the URL (the path)."""
        for upstream in self.upstreams:
            root = upstream.root
            if url.startswith(root) and (len(url) == len(root) or url[len(root)] in "/?"):
                return upstream, url[len(root) :]
        return None

    # -- health -----------------------------------------------------------------------------------

    async def probe(self, upstream: Upstream) -> bool:
        """Whether the upstream answers ``/health`` (vLLM, llama.cpp) or ``/v1/models`` (everyone)."""
        client = self._probe_client
        owned = client is None
        if client is None:
            client = httpx.AsyncClient(headers=self._headers, timeout=self.probe_timeout_s)
        try:
            for url in (f"{upstream.root}/health", f"{upstream.base_url}/models"):
                try:
                    response = await client.get(url)
                except httpx.HTTPError as err:
                    upstream.last_error = f"{url}: {type(err).__name__}"
                    return False
                if response.status_code == 200:
                    return True
            upstream.last_error = f"{url} returned {response.status_code}"
            return False
        finally:
            if owned:
                await client.aclose()

    async def check(self) -> list[bool]:
        """Probe every upstream now and update its health; True where it answered."""
        results = await asyncio.gather(*(self.probe(u) for u in self.upstreams))
        for upstream, ok in zip(self.upstreams, results):
            if ok and not upstream.healthy:
                self.mark_up(upstream)
            elif not ok:
                self.mark_down(upstream, upstream.last_error or "health check failed")
        return list(results)

    async def _probe_loop(self) -> None:
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                if time.monotonic() - last_full >= self.health_interval_s:
                    last_full = time.monotonic()
                    await self.check()
                    continue
                down = [u for u in self.upstreams if not u.healthy]
                if down:
                    results = await asyncio.gather(*(self.probe(u) for u in down))
                    for upstream, ok in zip(down, results):
                        if ok:
                            self.mark_up(upstream)
            except Exception:  # a probe must never kill the loop that heals the pool
                logger.debug("upstream probe failed", exc_info=True)

    def start(self) -> None:
        """Start the background health checks (needs a running event loop)."""
        if self._probe_task is None:
            self._probe_client = httpx.AsyncClient(headers=self._headers, timeout=self.probe_timeout_s)
            self._probe_task = asyncio.create_task(self._probe_loop(), name="markov-rsa-upstream-probe")

    async def aclose(self) -> None:
        """Stop the health checks."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        if self._probe_client is not None:
            await self._probe_client.aclose()
            self._probe_client = None


def outcome_of(err: BaseException | None) -> str:
    """The :data:`CallObserver` outcome of a call that ended with ``err`` (None: success)."""
    if err is None:
        return "ok"
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    if isinstance(err, BackendError):
        if err.timeout:
            return "timeout"
        if err.status is None:
            # An answer that was not JSON came from a live server; anything else without a
            # status is a connection that failed.
            return "server_error" if "malformed JSON" in str(err) else "connect_error"
        return "server_error" if err.status >= 500 else "client_error"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.TransportError):
        return "connect_error"
    return "server_error"


class RoutedBackend(OpenAIBackend):
    """The HTTP backend over an :class:`UpstreamPool`.

    Every HTTP exchange (chat completions, ``/models``, ``/tokenize``) is sent to the pool's choice
    at that moment, so retries move to another replica and a replica that dies mid-run only costs
    the calls it had in flight. The replicas must serve the same model with the same tokenizer.
    A request whose ``extra`` carries a ``model`` asks for that model instead of the backend's.
    """

    def __init__(self, pool: UpstreamPool, model: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        concurrency = kwargs.pop("concurrency", pool.per_upstream_concurrency * len(pool.upstreams))
        super().__init__(pool.upstreams[0].base_url, model, api_key, concurrency=concurrency, **kwargs)
        self.pool = pool
        self.name = ", ".join(u.base_url for u in pool.upstreams)

    def _payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        payload = super()._payload(request, model)
        requested = request.extra.get("model")
        if isinstance(requested, str) and requested:
            payload["model"] = requested
        return payload

    async def _send(self, method: str, url: str, payload: Any | None = None, timeout: float | None = None) -> Any:
        target = self.pool.for_url(url)
        if target is None:
            return await super()._send(method, url, payload, timeout)
        _, path = target
        upstream = await self.pool.acquire()
        error: BaseException | None = None
        try:
            return await super()._send(method, upstream.root + path, payload, timeout)
        except BaseException as err:
            error = err
            raise
        finally:
            self.pool.release(upstream, outcome_of(error), str(error) if error is not None else None)

    async def _stream_once(self, request: GenerationRequest, on_delta: Any, state: Any, url: str | None = None) -> Any:
        upstream = await self.pool.acquire()
        error: BaseException | None = None
        try:
            return await super()._stream_once(request, on_delta, state, url=f"{upstream.base_url}/chat/completions")
        except BaseException as err:
            error = err
            raise
        finally:
            self.pool.release(upstream, outcome_of(error), str(error) if error is not None else None)
