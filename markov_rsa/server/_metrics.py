"""Prometheus metrics of one proxy app (its own registry: two apps in a process never share counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._events import Event, Progress, RolloutFinished, RoundFinished

if TYPE_CHECKING:
    from .._routing import Upstream, UpstreamPool

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_SLOW = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class _PoolCollector(Collector):
    """Upstream health and load, read from the pool at scrape time."""

    def __init__(self, pool: Callable[[], UpstreamPool | None]) -> None:
        self._pool = pool

    def collect(self):  # type: ignore[no-untyped-def]
        pool = self._pool()
        healthy = GaugeMetricFamily("markov_rsa_upstream_healthy", "1 while an upstream is in rotation", labels=["upstream"])
        outstanding = GaugeMetricFamily(
            "markov_rsa_upstream_outstanding_requests", "Requests in flight on an upstream", labels=["upstream"]
        )
        if pool is not None:
            for upstream in pool.upstreams:
                healthy.add_metric([upstream.name], 1.0 if upstream.healthy else 0.0)
                outstanding.add_metric([upstream.name], float(upstream.outstanding))
        yield healthy
        yield outstanding


class Metrics:
    """Counters, gauges and histograms of the proxy; names start with ``markov_rsa_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "markov_rsa_requests", "HTTP requests by endpoint, mode and outcome", ["endpoint", "mode", "outcome"], registry=r
        )
        self.latency = Histogram(
            "markov_rsa_request_duration_seconds", "Time to the complete response, by mode", ["mode"], buckets=_FAST, registry=r
        )
        self.in_flight = Gauge("markov_rsa_requests_in_flight", "Requests being served, by mode", ["mode"], registry=r)
        self.runs = Counter("markov_rsa_runs", "RSA runs by outcome", ["outcome"], registry=r)
        self.runs_active = Gauge("markov_rsa_runs_active", "RSA runs executing", registry=r)
        self.runs_queued = Gauge("markov_rsa_runs_queued", "RSA runs waiting for a slot", registry=r)
        self.run_latency = Histogram(
            "markov_rsa_run_duration_seconds", "Wall time of finished RSA runs", buckets=_SLOW, registry=r
        )
        self.rounds = Counter("markov_rsa_rounds", "RSA rounds completed", registry=r)
        self.round_latency = Histogram(
            "markov_rsa_round_duration_seconds", "Wall time of RSA rounds", buckets=_SLOW, registry=r
        )
        self.rollouts = Counter("markov_rsa_rollouts", "Rollouts of RSA runs by outcome", ["outcome"], registry=r)
        self.upstream_calls = Counter(
            "markov_rsa_upstream_requests", "Calls to upstreams by upstream and outcome", ["upstream", "outcome"], registry=r
        )
        self.upstream_retries = Counter(
            "markov_rsa_upstream_retries", "Upstream calls that were retries of a failed one", ["mode"], registry=r
        )
        self.tokens = Counter("markov_rsa_tokens", "Tokens upstreams reported, by mode and kind", ["mode", "kind"], registry=r)
        self._pool: UpstreamPool | None = None
        r.register(_PoolCollector(lambda: self._pool))
        # Label children are resolved once: the lookup costs more than the increment.
        self.passthrough_in_flight = self.in_flight.labels("passthrough")
        self._upstream_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def watch_pool(self, pool: UpstreamPool) -> None:
        """Report this pool's upstreams."""
        self._pool = pool

    def upstream_call(self, upstream: Upstream, outcome: str) -> None:
        """Count one finished upstream call (the pool's observer); upstreams are labelled by name."""
        key = (upstream.name, str(outcome))
        child = self._upstream_children.get(key)
        if child is None:
            child = self._upstream_children[key] = self.upstream_calls.labels(*key)
        child.inc()

    def request(self, endpoint: str, mode: str, outcome: str, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (endpoint, mode, outcome)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(*key), self.latency.labels(mode))
        children[0].inc()
        children[1].observe(seconds)


class RunMetrics:
    """Feeds one RSA run's events into :class:`Metrics` (a consumer of the controller's events)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.last = Progress()

    def __call__(self, event: Event) -> None:
        progress = event.progress
        last = self.last
        m = self.metrics
        if progress.retries > last.retries:
            m.upstream_retries.labels("rsa").inc(progress.retries - last.retries)
        if progress.prompt_tokens > last.prompt_tokens:
            m.tokens.labels("rsa", "prompt").inc(progress.prompt_tokens - last.prompt_tokens)
        if progress.completion_tokens > last.completion_tokens:
            m.tokens.labels("rsa", "completion").inc(progress.completion_tokens - last.completion_tokens)
        if isinstance(event, RolloutFinished):
            m.rollouts.labels("failed" if event.record.error else "ok").inc()
        elif isinstance(event, RoundFinished):
            m.rounds.inc()
            m.round_latency.observe(event.summary.wall_s)
        self.last = progress
