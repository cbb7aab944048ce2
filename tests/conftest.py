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
