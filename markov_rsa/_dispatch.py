"""Hands rollouts to the backend as they become ready, grouping those that became ready together.

Under dataflow scheduling each aggregation call is released on its own, when its parents finish.
A backend that batches (the local engine) still gets one batch for calls released by the same
event: everything submitted within one pass of the event loop goes out as one ``generate`` call.
"""

from __future__ import annotations

import asyncio

from ._backend import Backend, Outcome
from ._errors import BackendError
from ._types import GenerationRequest


class Dispatcher:
    """Submits requests to a backend; each submission gets a future of its outcome.

    Cancelling a future drops interest in that rollout; a batch whose every future is done or
    cancelled is closed, which cancels what it still had running. :meth:`aclose` stops everything.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._pending: list[tuple[GenerationRequest, asyncio.Future[Outcome]]] = []
        self._batches: set[asyncio.Task[None]] = set()

    def submit(self, request: GenerationRequest) -> asyncio.Future[Outcome]:
        """Queue one rollout; it is sent with whatever else is submitted in this pass of the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((request, future))
        return future

    def _flush(self) -> None:
        batch = [(request, future) for request, future in self._pending if not future.done()]
        self._pending = []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)
        futures = [future for _, future in batch]

        def on_done(future: asyncio.Future[Outcome]) -> None:
            # Nobody waits for what is left of the batch: stop generating it.
            if future.cancelled() and not task.done() and all(f.done() for f in futures):
                task.cancel()

        for future in futures:
            future.add_done_callback(on_done)

    async def _run(self, batch: list[tuple[GenerationRequest, asyncio.Future[Outcome]]]) -> None:
        missing: Outcome = BackendError("the backend returned no result for this rollout")
        try:
            async for index, outcome in self._backend.generate([request for request, _ in batch]):
                future = batch[index][1]
                if not future.done():
                    future.set_result(outcome)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - a backend that raises instead of yielding fails its batch
            missing = BackendError(f"{type(err).__name__}: {err}")
        for _, future in batch:
            if not future.done():
                future.set_result(missing)

    async def aclose(self) -> None:
        """Cancel every batch still running and wait until they have stopped."""
        for _, future in self._pending:
            future.cancel()
        self._pending = []
        batches = list(self._batches)
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)
