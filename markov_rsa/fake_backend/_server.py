"""Running the simulated backend: in a background thread (tests, notebooks) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import uvicorn

from .._loop import available, new_event_loop
from ._app import app_state, create_app
from ._config import FakeBackendConfig
from ._state import SimulatedDrop

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


class _QuietSimulatedFaults(logging.Filter):
    """Drops uvicorn's error records for connections the simulation closes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, SimulatedDrop)


def _quiet_simulated_faults() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietSimulatedFaults) for f in logger.filters):
        logger.addFilter(_QuietSimulatedFaults())


class _Server(uvicorn.Server):
    """uvicorn's server, ending the app's waits (hangs, queues, slow streams) when it shuts down."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        # uvicorn polls should_exit every 0.1 s; waking the loop lets stop() return sooner.
        if not hasattr(self, "on_tick"):
            await super().main_loop()
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def request_exit(self) -> None:
        """Ask the server to stop, from any thread."""
        self.should_exit = True
        self.force_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app_state(self._app).close()
        await super().shutdown(sockets=sockets)


def _uvicorn_config(app: Any, host: str, port: int, embedded: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools" if available("httptools") else "h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        # Embedded servers leave the process's logging configuration alone.
        log_config=None if embedded else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=2,
    )


class FakeBackend:
    """The simulated backend on loopback, served from a background thread with its own event loop.

    ``port=0`` picks a free port. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, config: FakeBackendConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config if config is not None else FakeBackendConfig()
        self.host = host
        self.port = port
        self.app, self.stats = create_app(self.config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``url + "/v1"``)."""
        return self.url + "/v1"

    def start(self) -> Self:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        _quiet_simulated_faults()
        app_state(self.app).reopen()
        self._server = _Server(_uvicorn_config(self.app, self.host, self.port, embedded=True), self.app)
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"fake-backend:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulated backend did not start: {self._error!r}")
            time.sleep(0.002)
        return self

    def _run(self, sock: socket.socket) -> None:
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        assert self._server is not None
        try:
            loop.run_until_complete(self._server.serve(sockets=[sock]))
        except BaseException as err:  # noqa: BLE001 - reported by start(); the thread must not die silently
            self._error = err
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                sock.close()

    def stop(self) -> None:
        """Stop serving. Requests still waiting (hangs, queues) are cut off, so this never hangs."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return
        server.request_exit()
        thread.join(_STOP_TIMEOUT_S)
        self._thread = None
        self._loop = None

    def reset_stats(self) -> None:
        """Zero the stats and restart the script (on the server's loop, between requests)."""
        self._on_loop(app_state(self.app).reset)

    def hold(self, after: int) -> None:
        """Hold every generation request after the first ``after`` (counted since the last stats reset):
        each is logged in the stats on arrival, then waits unanswered until :meth:`release`.

        Lets a test stop a client at a known point (e.g. kill it while a round is in flight)
        without racing the clock.
        """
        state = app_state(self.app)
        self._on_loop(lambda: setattr(state, "hold_from", after))

    def release(self) -> None:
        """Answer the held requests and stop holding."""
        self._on_loop(app_state(self.app).release)

    def _on_loop(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the server's loop between requests, and wait for it (directly when stopped)."""
        loop = self._loop
        if loop is None or self._thread is None or loop.is_closed():
            action()
            return
        done = threading.Event()

        def run() -> None:
            try:
                action()
            finally:
                done.set()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(run)
            done.wait(_STOP_TIMEOUT_S)
            return
        action()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        running = "running" if self._thread is not None else "stopped"
        return f"FakeBackend({self.url}, model={self.config.model!r}, {running})"


def serve(config: FakeBackendConfig, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve the simulated backend in the foreground until interrupted (``markov-rsa fake-backend``)."""
    app, _ = create_app(config)
    server = _Server(_uvicorn_config(app, host, port, embedded=False), app)
    _quiet_simulated_faults()  # after uvicorn has configured logging
    server.run()


__all__ = ["FakeBackend", "serve"]
