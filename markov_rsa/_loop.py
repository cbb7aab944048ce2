"""The event loop of every run markov-rsa starts itself: uvloop when installed, else asyncio's.

The CLI (``solve``, ``eval``), the synchronous :func:`markov_rsa.solve`, the proxy and the simulated
backend all run on it. Measured with ``bench/orchestration.py``, uvloop takes about a tenth off the
orchestrator's CPU per rollout. Code that awaits the async API runs on whatever loop its caller
chose.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed."""
    if available("uvloop"):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on :func:`new_event_loop` (Ctrl-C cancels ``main`` the same way)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
