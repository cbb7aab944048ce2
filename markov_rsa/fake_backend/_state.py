"""Live statistics and per-application state of the simulated backend."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ._config import FakeBackendConfig

FAULT_KINDS = ("5xx", "429", "hang", "drop", "malformed")


class SimulatedDrop(Exception):
    """Raised inside a response to make the server close the connection mid-response."""


# -- statistics ------------------------------------------------------------------------------------


def _zero_usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@dataclass
class FakeBackendStats:
    """Live counters of a simulated backend. Mutated only on the server's event loop."""

    requests: int = 0
    served: int = 0
    cancelled: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    usage: dict[str, int] = field(default_factory=_zero_usage)
    max_in_flight: int = 0
    in_flight: int = 0
    requests_log: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        """Zero the counters in place (requests still generating keep counting as in flight)."""
        self.requests = self.served = self.cancelled = 0
        self.faults.update(dict.fromkeys(FAULT_KINDS, 0))
        self.usage.update(_zero_usage())
        self.max_in_flight = self.in_flight
        self.requests_log.clear()

    def to_dict(self, include_log: bool = False) -> dict[str, Any]:
        """The counters as plain JSON-ready data; the request bodies only when asked for."""
        data: dict[str, Any] = {
            "requests": self.requests,
            "served": self.served,
            "cancelled": self.cancelled,
            "faults": dict(self.faults),
            "usage": dict(self.usage),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "requests_logged": len(self.requests_log),
        }
        if include_log:
            data["requests_log"] = list(self.requests_log)
        return data


# -- server state ----------------------------------------------------------------------------------


class ServerState:
    """Per-application state: config, stats, the generation slots and the scripted-answer cursor."""

    def __init__(self, config: FakeBackendConfig) -> None:
        self.config = config
        self.stats = FakeBackendStats()
        self.created = int(time.time())
        self.script_cursor = 0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.semaphore: asyncio.Semaphore | None = None
        self.closing: asyncio.Future[None] | None = None
        self.hold_from: int | None = None
        """Generation requests from this arrival number on wait for :meth:`release` before answering."""
        self._released: asyncio.Future[None] | None = None

    def bind(self) -> None:
        """Create the loop-bound objects for the running loop (once per loop the app runs on)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        limit = self.config.max_concurrency
        self.semaphore = asyncio.Semaphore(limit) if limit > 0 else None
        self.closing = loop.create_future()
        if self.closed:
            self.closing.set_result(None)

    def close(self) -> None:
        """End every wait in progress: the server is shutting down. Call on the loop thread."""
        self.closed = True
        if self.closing is not None and not self.closing.done():
            self.closing.set_result(None)

    def reopen(self) -> None:
        """Undo :meth:`close` for a server that starts again on a fresh loop."""
        self.closed = False
        self._loop = None

    async def wait_if_held(self, number: int) -> None:
        """Park request ``number`` while requests from :attr:`hold_from` on are held (or until shutdown)."""
        if self.hold_from is None or number < self.hold_from:
            return
        assert self._loop is not None and self.closing is not None
        if self._released is None or self._released.done():
            self._released = self._loop.create_future()
        await asyncio.wait({self._released, self.closing}, return_when=asyncio.FIRST_COMPLETED)

    def release(self) -> None:
        """Answer the held requests and hold no more. Call on the loop thread."""
        self.hold_from = None
        if self._released is not None and not self._released.done():
            self._released.set_result(None)

    def reset(self) -> None:
        """Zero the stats and restart the script. Call on the loop thread."""
        self.stats.reset()
        self.script_cursor = 0

    def record(self, body: dict[str, Any]) -> int:
        """Count and log a generation request; its 0-based arrival number."""
        stats = self.stats
        number = stats.requests
        stats.requests += 1
        stats.requests_log.append(body)
        limit = self.config.request_log_limit
        if limit and len(stats.requests_log) > limit:
            del stats.requests_log[0]
        return number

    def draw_fault(self, number: int, seed: object = None) -> str | None:
        """The fault injected into request ``number`` (carrying ``seed``): a 5xx for seeds in
        ``fail_seeds``, else each kind drawn independently, in a fixed order."""
        config = self.config
        if seed in config.fail_seeds:
            self.stats.faults["5xx"] += 1
            return "5xx"
        rates = (
            config.fault_rate_5xx,
            config.fault_rate_429,
            config.fault_rate_hang,
            config.fault_rate_drop,
            config.fault_rate_malformed,
        )
        if not any(rates):
            return None
        rng = random.Random(f"fault:{config.seed}:{number}")
        draws = [rng.random() for _ in rates]
        for kind, rate, draw in zip(FAULT_KINDS, rates, draws):
            if draw < rate:
                self.stats.faults[kind] += 1
                return kind
        return None
