"""Several upstream servers behind one backend: least-outstanding-requests routing, health checks.

An :class:`UpstreamPool` tracks, for each upstream OpenAI-compatible server, how many requests are in
flight and whether it is healthy. Every call leases the healthy upstream with the fewest requests
outstanding (under a per-upstream cap). An upstream whose connection fails is taken out at once (a
server that refuses connections will not start accepting them by the next request); one that keeps
answering 5xx is taken out after a few in a row. A background probe puts it back as soon as its
``/health`` (or ``/v1/models``) answers again (the probes are
:class:`markov_rsa.upstream.UpstreamClient`'s; this module holds no HTTP code).

A single URL is a pool of one: the HTTP backend and the proxy's relay always route through a pool,
and every attempt of every call goes to the pool's choice at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import CallOutcome, ConfigError, ErrorKind, BackendError

CallObserver = Callable[["Upstream", CallOutcome], None]
"""Told about every finished upstream call: ``(upstream, outcome)``."""


def root_url(base_url: str) -> str:
    """The server root of an OpenAI base URL (``http://h:8000/v1`` -> ``http://h:8000``); a path
    prefix before ``/v1`` is kept (``http://h/prefix/v1`` -> ``http://h/prefix``)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def check_url(url: str, param: str = "backend") -> str:
    """``url`` without a trailing slash; :class:`ConfigError` unless it is an absolute http(s) URL."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{param} URL must start with http:// or https://, got {url!r}", param=param)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as err:
        raise ConfigError(f"invalid {param} URL {url!r}: {err}", param=param) from None
    if not parsed.host or (parsed.port is not None and not 0 < parsed.port < 65536):
        raise ConfigError(f"invalid {param} URL {url!r}: no host, or a port out of range", param=param)
    return url.rstrip("/")


@dataclass(eq=False)
class Upstream:
    """One upstream server and what the pool knows about it."""

    base_url: str
    """The OpenAI base URL, e.g. ``http://10.0.0.5:8000/v1``."""
    name: str = ""
    """What clients and metrics call it: ``upstream 1`` or the configured name, never its address."""
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

    def to_dict(self, *, details: bool = True) -> dict[str, Any]:
        """State for ``/ready`` and logs; without ``details`` only the name and health (no address)."""
        if not details:
            return {"name": self.name, "healthy": self.healthy}
        return {
            "name": self.name,
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
        observer: CallObserver | None = None,
    ) -> None:
        if not urls:
            raise ConfigError("at least one upstream URL is needed", param="upstream")
        if per_upstream_concurrency < 1:
            raise ConfigError("upstream concurrency must be at least 1", param="upstream_concurrency")
        named: dict[str, str] = {}
        for entry in urls:
            name, url = split_name(entry)
            url = check_url(url)
            named.setdefault(url, name or f"upstream {len(named) + 1}")
        self.upstreams = [Upstream(url, name) for url, name in named.items()]
        self.per_upstream_concurrency = per_upstream_concurrency
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.observer = observer
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._turn = 0

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
            raise BackendError("no upstream could be reached", kind=ErrorKind.connect, retriable=True)
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

    def release(self, upstream: Upstream, outcome: CallOutcome = CallOutcome.ok, error: str | None = None) -> None:
        """Give a lease back and record how the call ended (see :data:`CallObserver`).

        A connection that could not be opened takes the upstream out at once; server errors and
        broken answers count towards ``failure_threshold``; a success or a client error resets it.
        """
        upstream.outstanding -= 1
        if outcome is CallOutcome.connect_error:
            self.mark_down(upstream, error or "connection failed")
        elif outcome in (CallOutcome.server_error, CallOutcome.protocol_error):
            upstream.consecutive_failures += 1
            upstream.last_error = error
            if upstream.consecutive_failures >= self.failure_threshold:
                self.mark_down(upstream, error or "repeated server errors")
        elif outcome in (CallOutcome.ok, CallOutcome.client_error):
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

    def check_results(self, upstreams: Sequence[Upstream], results: Sequence[bool]) -> None:
        """Update health from probe results (True: it answered)."""
        for upstream, ok in zip(upstreams, results):
            if ok and not upstream.healthy:
                self.mark_up(upstream)
            elif not ok:
                self.mark_down(upstream, upstream.last_error or "health check failed")


def split_name(entry: str) -> tuple[str | None, str]:
    """``NAME=URL`` gives an upstream the name clients see; a bare URL is named by its position."""
    name, sep, url = entry.partition("=")
    if sep and "://" not in name and name.strip():
        return name.strip(), url.strip()
    return None, entry.strip()
