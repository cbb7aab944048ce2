"""``markov-rsa serve`` logs: one format (text or JSON), the access log, quiet libraries, x-request-id."""

from __future__ import annotations

import json
import logging
import logging.config
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from markov_rsa.server._logging import QUIET_LOGGERS, logging_config

CLI = str(Path(sys.executable).parent / "markov-rsa")


class Served:
    """A ``markov-rsa serve`` process whose stderr lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [CLI, "serve", "--port", str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, match: Callable[[str], bool], timeout: float = 60.0) -> str:
        """The first stderr line (seen before or arriving now) that ``match`` accepts."""
        for line in self.seen:
            if match(line):
                return line
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            if match(line):
                return line

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(*args)
        started.append(served)
        # uvicorn says it is running once the socket listens; "Application startup complete" comes
        # before the socket is bound, so a request right after it can be refused.
        served.wait_for(lambda line: "Uvicorn running" in line)
        return served

    yield start
    for served in started:
        served.stop()


def _json(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def test_json_logs_access_log_and_request_id(fake_backend: Any, serve: Callable[..., Served]) -> None:
    upstream = fake_backend(length_mean=30, error_rate=0.0, aggregation_error_rate=0.0)
    served = serve("--backend", upstream.base_url, "--log-format", "json", "--access-log", "--preset", "smoke")
    reply = httpx.get(f"{served.url}/health", headers={"x-request-id": "probe-7"}, timeout=30)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "probe-7"
    access = _json(served.wait_for(lambda line: _json(line).get("request_id") == "probe-7"))
    assert access["logger"] == "uvicorn.access" and access["path"] == "/health" and access["status"] == 200

    # An RSA run logs its outcome under the request's id.
    chat = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": "fake-reasoner", "messages": [{"role": "user", "content": "What is 6 * 7?"}]},
        headers={"x-request-id": "run-42"},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.headers["x-request-id"] == "run-42"
    run_line = _json(served.wait_for(lambda line: "rsa run ok" in _json(line).get("message", "")))
    assert run_line["request_id"] == "run-42" and run_line["logger"] == "markov_rsa.server"

    # A request id that is not a sane token is replaced by one of ours.
    odd = httpx.get(f"{served.url}/health", headers={"x-request-id": "has spaces in it"}, timeout=30)
    assert odd.headers["x-request-id"] != "has spaces in it" and len(odd.headers["x-request-id"]) == 32
    fresh = httpx.get(f"{served.url}/health", timeout=30).headers["x-request-id"]
    assert fresh != odd.headers["x-request-id"]
    served.wait_for(lambda line: _json(line).get("request_id") == fresh)
    # Every line written so far, uvicorn's own included, is one JSON object.
    assert served.seen and all(_json(line) for line in served.seen), served.seen


def test_text_logs_without_access_log(fake_backend: Any, serve: Callable[..., Served]) -> None:
    upstream = fake_backend(length_mean=30)
    served = serve("--backend", upstream.base_url)
    reply = httpx.get(f"{served.url}/health", headers={"x-request-id": "t-1"}, timeout=30)
    assert reply.headers["x-request-id"] == "t-1"
    httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": "fake-reasoner", "messages": [{"role": "user", "content": "What is 1 + 1?"}],
              "rsa": {"n": 2, "k": 1, "t": 1}},
        headers={"x-request-id": "t-2"},
        timeout=60,
    )
    line = served.wait_for(lambda line: "rsa run" in line)
    assert " INFO markov_rsa.server [t-2]: rsa run" in line
    assert not any("GET /health" in seen for seen in served.seen)  # no access log unless asked


def test_library_loggers_are_quiet() -> None:
    logging.config.dictConfig(logging_config("debug", "text"))
    try:
        assert logging.getLogger("markov_rsa.server").isEnabledFor(logging.DEBUG)
        for name in QUIET_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    finally:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}})
