"""The synchronous face of the Python API."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from ._controller import MarkovRSA, Problem
from ._events import Event, EventHandler
from ._loop import run as run_loop
from ._params import RSAParams, resolve_params
from ._result import RSAResult
from ._runlog import RunLog
from ._settings import BackendSettings, Layers, make_backend


def _both(log: RunLog, on_event: EventHandler) -> EventHandler:
    async def handle(event: Event) -> None:
        log(event)
        outcome = on_event(event)
        if inspect.isawaitable(outcome):
            await outcome

    return handle


def solve(
    problem: Problem,
    *,
    backend: str | BackendSettings | Any,
    model: str | None = None,
    api_key: str | None = None,
    params: RSAParams | None = None,
    preset: str | None = None,
    on_event: EventHandler | None = None,
    concurrency: int = 64,
    run_dir: str | None = None,
    **overrides: Any,
) -> RSAResult:
    """Solve one problem and block until done.

    ``backend`` is an OpenAI base URL (``http://localhost:8000/v1``, with ``model``, ``api_key`` and
    ``concurrency``), a :class:`BackendSettings` (``BackendSettings()`` reads ``MARKOV_RSA_*``), or a
    :class:`Backend` object.
    Parameter overrides go as keywords (``n=8, t=3``) on top of ``preset`` and ``params``.
    ``run_dir`` logs the run as JSONL there (see :class:`RunLog`). Works from plain scripts and
    from inside a running event loop (a notebook): there the run goes to a worker thread.
    """
    resolved = resolve_params(preset, overrides, base=params)

    async def run() -> RSAResult:
        log = RunLog(run_dir) if run_dir else None
        handler = on_event
        if log is not None:
            handler = log if on_event is None else _both(log, on_event)
        try:
            if isinstance(backend, (str, BackendSettings)):
                settings = backend if isinstance(backend, BackendSettings) else Layers().settings(
                    BackendSettings,
                    {"backend": [backend], "model": model, "backend_api_key": api_key, "concurrency": concurrency},
                )
                opened = make_backend(settings)
                try:
                    return await MarkovRSA(opened, resolved).solve(problem, handler)
                finally:
                    await opened.aclose()
            return await MarkovRSA(backend, resolved).solve(problem, handler)
        finally:
            if log is not None:
                log.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_loop(run())
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["result"] = run_loop(run())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=worker, name="markov-rsa-solve")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]
