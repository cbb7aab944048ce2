"""Shared fixtures: simulated backends on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from markov_rsa.fake_backend import FakeBackend, FakeBackendConfig


@pytest.fixture
def fake_backend() -> Iterator[Callable[..., FakeBackend]]:
    """Start simulated backends with the given config fields; all are stopped after the test."""
    started: list[FakeBackend] = []

    def start(**config: Any) -> FakeBackend:
        server = FakeBackend(FakeBackendConfig(**config)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., Any]]:
    """Start scripted raw-HTTP upstreams (``tests/upstream_servers.py``); all are stopped after the test."""
    from upstream_servers import RawUpstream

    started: list[RawUpstream] = []

    def start(handler: Any, **kwargs: Any) -> RawUpstream:
        server = RawUpstream(handler, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def serve_proxy() -> Iterator[Callable[..., Any]]:
    """Serve the proxy app in front of the given upstream URLs; all are stopped after the test."""
    from markov_rsa import RSAParams
    from markov_rsa.server import ServerConfig
    from test_proxy import RunningProxy

    started: list[RunningProxy] = []

    def start(*urls: str, **fields: Any) -> RunningProxy:
        fields.setdefault("defaults", RSAParams(n=2, k=2, t=1, selection="majority", max_tokens=50, seed=1))
        running = RunningProxy(ServerConfig(upstreams=list(urls), model="m", **fields))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
