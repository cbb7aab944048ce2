"""A headless Chromium driven over the DevTools protocol, for tests of what a person looks at.

Every network request, console message and uncaught exception of the page is recorded, so a test
can assert that a page loaded from ``file://`` fetched nothing and logged no error.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

# Known-good flags for a headless run in a container: no sandbox (root), no GPU, and none of
# Chromium's own background traffic (updates, sync, field trials), which would count as requests.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]
REPLY_TIMEOUT_S = 120.0
"""Upper bound on one protocol reply; a safety net on a busy machine, not a synchronisation."""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLog:
    """What a page did while loaded."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)


class Page:
    """One tab, attached through a flat DevTools session."""

    def __init__(self, socket: ClientConnection, session: str, ids: Iterator[int]) -> None:
        self.socket = socket
        self.session = session
        self.ids = ids
        self.log = PageLog()
        self.events: list[dict[str, Any]] = []

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params") or {}
        if method == "Network.requestWillBeSent":
            self.log.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.log.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            self.log.exceptions.append(str((details.get("exception") or {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.log.log_errors.append(str(params["entry"].get("text")))
        self.events.append(message)

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.socket.recv(timeout=REPLY_TIMEOUT_S))
        if message.get("sessionId") == self.session and "method" in message:
            self._record(message)
        return message

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one protocol command in this tab and return its result."""
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params, "sessionId": self.session}))
        while True:
            message = self._receive()
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result") or {}

    def wait_for(self, method: str, seen_before: int = 0) -> dict[str, Any]:
        """The first event ``method`` after the first ``seen_before`` events."""
        index = seen_before
        while True:
            while index < len(self.events):
                if self.events[index].get("method") == method:
                    return self.events[index]
                index += 1
            self._receive()

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        mark = len(self.events)
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", mark)

    def go_to_fragment(self, fragment: str) -> None:
        """Follow a link within the page (no load event: the document stays)."""
        self.evaluate(f"location.hash = {json.dumps(fragment)}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Size the page like a window of ``width`` × ``height`` CSS pixels."""
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def color_scheme(self, scheme: str) -> None:
        """Emulate ``prefers-color-scheme``: ``light`` or ``dark``."""
        self.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])

    def screenshot(self, *, full_page: bool = False, max_height: int = 6000) -> bytes:
        """A PNG of the viewport, or of the whole page (up to ``max_height`` pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1})
        return base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])


class Chromium:
    """A headless Chromium process with a fresh profile, and a DevTools connection to it."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="markov-rsa-chromium-")
        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.stderr: list[str] = []
        url = None
        assert self.process.stderr is not None
        for line in self.process.stderr:  # the browser announces its endpoint on stderr
            self.stderr.append(line)
            if line.startswith("DevTools listening on "):
                url = line.split(" on ", 1)[1].strip()
                break
        if url is None:
            self.close()
            raise RuntimeError("chromium exited before opening DevTools:\n" + "".join(self.stderr[-20:]))
        # Keep draining stderr so that a chatty browser never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        # Entered as a context manager (closed in close()), as websockets asks of a direct connection.
        self.socket = connect(url, max_size=None, open_timeout=REPLY_TIMEOUT_S, ping_interval=None).__enter__()
        self.ids = itertools.count(1)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def _browser_call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=REPLY_TIMEOUT_S))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result") or {}

    def new_page(self) -> Page:
        """A fresh tab with the page, runtime, network and log domains enabled."""
        target = self._browser_call("Target.createTarget", url="about:blank")["targetId"]
        session = self._browser_call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self.socket, session, self.ids)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        return page

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextmanager
def chromium(executable: str) -> Iterator[Chromium]:
    """A browser for the duration of a ``with`` block."""
    browser = Chromium(executable)
    try:
        yield browser
    finally:
        browser.close()


def distinct_colours(png: bytes) -> int:
    """How many different pixel colours a PNG holds (1 for a blank page)."""
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def save(png: bytes, path: str | os.PathLike[str]) -> Path:
    """Write a PNG (screenshots for the README)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)
    return target
