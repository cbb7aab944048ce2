"""Admission control of RSA runs: a fixed number execute, a bounded number wait, the rest get 429."""

from __future__ import annotations

import asyncio
from collections import deque


class RunTicket:
    """A place among the running or the waiting runs; give it back with :meth:`release`."""

    def __init__(self, limiter: RunLimiter, future: asyncio.Future[None] | None) -> None:
        self._limiter = limiter
        self._future = future
        self._running = future is None
        self._released = False

    @property
    def running(self) -> bool:
        """Whether the run holds a running slot."""
        return self._running

    async def wait(self) -> None:
        """Wait until the run may start."""
        if self._running:
            return
        assert self._future is not None
        await self._future
        self._running = True

    def release(self) -> None:
        """Leave: hand a running slot on to the next waiter, or give up the place in the queue."""
        if self._released:
            return
        self._released = True
        future = self._future
        if self._running or (future is not None and future.done() and not future.cancelled()):
            # A slot handed over to a waiter that gave up must be passed on, or it leaks.
            self._limiter._free_slot()
        else:
            self._limiter._leave_queue(self)


class RunLimiter:
    """Lets ``max_running`` runs execute at once and ``max_queued`` more wait, in arrival order."""

    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self._queue: deque[tuple[RunTicket, asyncio.Future[None]]] = deque()

    @property
    def queued(self) -> int:
        """Runs waiting for a slot."""
        return len(self._queue)

    def admit(self) -> RunTicket | None:
        """A ticket, or None when both the running slots and the queue are full (answer 429)."""
        if self.running < self.max_running and not self._queue:
            self.running += 1
            return RunTicket(self, None)
        if len(self._queue) >= self.max_queued:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = RunTicket(self, future)
        self._queue.append((ticket, future))
        return ticket

    def _free_slot(self) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                # The slot passes straight to the next waiter; ``running`` stays the same.
                future.set_result(None)
                return
        self.running -= 1

    def _leave_queue(self, ticket: RunTicket) -> None:
        for index, (queued, _) in enumerate(self._queue):
            if queued is ticket:
                del self._queue[index]
                return
