"""The generation thread: takes rollouts from every caller, runs them in batches, one batch at a time.

A dedicated thread rather than ``asyncio.to_thread`` per call: requests from concurrent callers
(the proxy serving several clients, a controller round) meet in one queue and share batches, and
outcomes are handed back to each caller's own event loop, so the engine survives ``asyncio.run``
being called more than once (the sync API does that).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from .._backend import Outcome
from .._errors import BackendError
from .._types import GenerationRequest


class Job:
    """One rollout waiting for, or in, a batch."""

    __slots__ = ("_deliver", "cancelled", "delivered", "index", "request", "submitted")

    def __init__(self, index: int, request: GenerationRequest, deliver: Callable[[int, Outcome], None]) -> None:
        self.index = index
        self.request = request
        self.submitted = time.perf_counter()
        self.cancelled = False
        """Set by the caller when it stops waiting; the batch drops the row at its next step."""
        self.delivered = False
        self._deliver = deliver

    def deliver(self, outcome: Outcome) -> None:
        """Hand the outcome to the caller, once."""
        if self.delivered:
            return
        self.delivered = True
        self._deliver(self.index, outcome)


def loop_delivery(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, Outcome]]) -> Callable[[int, Outcome], None]:
    """A thread-safe way to put outcomes into ``queue`` on ``loop``."""

    def deliver(index: int, outcome: Outcome) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, outcome))
        except RuntimeError:
            pass  # the caller's loop has closed; nobody is waiting for this outcome

    return deliver


class BatchWorker:
    """Runs ``run_batch`` on batches of at most ``max_batch_size`` jobs, in arrival order."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch_size: int, name: str) -> None:
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a batch is running or waiting."""
        with self._cond:
            return bool(self._running or self._pending)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs; those of one call are queued together so that they share a batch."""
        with self._cond:
            if self._closing:
                for job in jobs:
                    job.deliver(BackendError("the local engine is closed"))
                return
            self._pending.extend(jobs)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Fail what is queued, stop the running batch at its next step, and wait for the thread."""
        with self._cond:
            self._closing = True
            pending, self._pending = list(self._pending), deque()
            for job in self._running:
                job.cancelled = True
            self._cond.notify()
        for job in pending:
            job.deliver(BackendError("the local engine was closed before this rollout ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            batch: list[Job] = []
            while self._pending and len(batch) < self._max_batch_size:
                job = self._pending.popleft()
                if not job.cancelled:
                    batch.append(job)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch:
                    self._run_batch(batch)
            except BaseException as err:  # noqa: BLE001 - the thread must outlive any one batch
                for job in batch:
                    job.deliver(BackendError(f"local generation failed: {type(err).__name__}: {err}"))
            finally:
                for job in batch:
                    if not job.delivered:
                        job.deliver(BackendError("local generation ended without a result"))
                with self._cond:
                    self._running = []
