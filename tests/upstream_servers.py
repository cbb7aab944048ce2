"""Small misbehaving upstreams for the upstream-layer tests: raw HTTP/1.x on loopback, each answer
written byte by byte by a script, and a forward HTTP proxy."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


ANSWER = "Adding gives 42. The answer is \\boxed{42}."


@dataclass
class Request:
    """One request as the server read it."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Handler = Callable[[Request, asyncio.StreamWriter, "RawUpstream"], Awaitable[bool]]
"""Writes the answer to a request; returns whether the connection stays open for the next one."""


ClientHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Threaded:
    """A TCP server on 127.0.0.1 in its own thread and event loop."""

    port = 0

    def _serve(self, on_client: ClientHandler, tls: ssl.SSLContext | None = None) -> None:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._task = asyncio.current_task()
            server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=tls)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            try:
                await server.serve_forever()
            except asyncio.CancelledError:
                pass
            finally:
                server.close()
                others = [t for t in asyncio.all_tasks() if t is not self._task]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        self._thread = threading.Thread(target=lambda: self._loop.run_until_complete(serve()), daemon=True)
        self._thread.start()
        assert started.wait(10), "the test server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        self._loop.close()


@dataclass
class RawUpstream(_Threaded):
    """A loopback server running ``handler`` for every request, in its own thread and event loop."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closed_connections: int = 0
    stamps: list[float] = field(default_factory=list)

    def start(self) -> RawUpstream:
        self._serve(self._on_client, self.tls)
        return self

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, target, version, headers, body)
                self.requests.append(request)
                if not await self.handler(request, writer, self):
                    return
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self.closed_connections += 1
            writer.close()


def response(status: int, body: bytes, headers: dict[str, str] | None = None, *, version: str = "HTTP/1.1",
             content_type: str = "application/json", length: bool = True) -> bytes:
    """A complete response as bytes."""
    lines = [f"{version} {status} X"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def completion(content: str = ANSWER, reasoning: str = "Let me add the numbers.") -> dict[str, Any]:
    """A ``chat.completion`` body."""
    return {
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content, "reasoning": reasoning}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def sse_body(content: str = ANSWER) -> bytes:
    """A streamed completion of ``content`` in a few pieces, ending with usage and ``[DONE]``."""
    frames = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    for start in range(0, len(content), 8):
        frames.append({"choices": [{"index": 0, "delta": {"content": content[start:start + 8]}, "finish_reason": None}]})
    frames.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    frames.append({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    return b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + b"data: [DONE]\n\n"


def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "m", "object": "model"}]}


def default_body(request: Request) -> tuple[bytes, str]:
    """What a well-behaved OpenAI-compatible server answers (body, content type); tokenizer endpoints
    answer 404, so tails fall back to tiktoken unless a test adds them."""
    path = request.target.split("?")[0]
    if path.endswith("/models"):
        return json.dumps(models()).encode(), "application/json"
    if path.endswith("/health"):
        return b"{}", "application/json"
    if path.endswith("/chat/completions"):
        if (request.json or {}).get("stream"):
            return sse_body(), "text/event-stream"
        return json.dumps(completion()).encode(), "application/json"
    return b"", ""


async def well_behaved(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
    """Answers like a plain OpenAI-compatible server."""
    body, ctype = default_body(request)
    writer.write(response(200, body, content_type=ctype) if ctype else response(404, b'{"error": "no route"}'))
    await writer.drain()
    return True


# -- misbehaviours -------------------------------------------------------------------------------------


async def gzipping(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
    """Gzips every body, whatever the client accepts."""
    body, ctype = default_body(request)
    if not ctype:
        return await well_behaved(request, writer, server)
    writer.write(response(200, gzip.compress(body), {"Content-Encoding": "gzip"}, content_type=ctype))
    await writer.drain()
    return True


async def chunked_with_trailers(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
    body, ctype = default_body(request)
    if not ctype:
        return await well_behaved(request, writer, server)
    writer.write(response(200, b"", {"Transfer-Encoding": "chunked", "Trailer": "X-Checksum"}, content_type=ctype,
                          length=False))
    for start in range(0, len(body), 50):
        piece = body[start:start + 50]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\nX-Checksum: abc\r\n\r\n")
    await writer.drain()
    return True


async def http10_close(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
    """HTTP/1.0, no Content-Length: the body ends when the server closes the connection."""
    body, ctype = default_body(request)
    if not ctype:
        return await well_behaved(request, writer, server)
    writer.write(response(200, body, {"Connection": "close"}, version="HTTP/1.0", content_type=ctype, length=False))
    await writer.drain()
    return False


def closing_idle(idle_s: float) -> Handler:
    """Keeps connections alive, then closes each one that stays idle for ``idle_s``."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        await well_behaved(request, writer, server)
        server.idle_close = asyncio.get_running_loop().call_later(idle_s, writer.close)  # type: ignore[attr-defined]
        return True

    return handler


def dripping(interval_s: float, *, head_first: bool) -> Handler:
    """Sends one byte every ``interval_s``, forever: after a complete head, or as the head itself."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if request.target.split("?")[0].endswith(("/models", "/health")):
            return await well_behaved(request, writer, server)
        stream = bool((request.json or {}).get("stream"))
        if head_first:
            ctype = "text/event-stream" if stream else "application/json"
            writer.write(response(200, b"", {"Transfer-Encoding": "chunked"}, content_type=ctype, length=False))
        for byte in (b" " * 1_000_000) if head_first else b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 1_000_000:
            await asyncio.sleep(interval_s)
            writer.write(b"1\r\n \r\n" if head_first else bytes([byte]))
            await writer.drain()
        return False

    return handler


def redirecting(status: int, location: Callable[[Request, RawUpstream], str]) -> Handler:
    """Redirects chat completions (and only them) to ``location``; serves ``/v2`` like ``/v1``."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if request.target.startswith("/v1/chat/completions"):
            writer.write(response(status, b"", {"Location": location(request, server)}, content_type=""))
            await writer.drain()
            return True
        return await well_behaved(request, writer, server)

    return handler


def garbage(content_type: str, body: bytes) -> Handler:
    """Answers chat completions with 200 and ``body`` (HTML, plain text) instead of JSON or SSE."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if request.target.endswith("/chat/completions"):
            writer.write(response(200, body, content_type=content_type))
            await writer.drain()
            return True
        return await well_behaved(request, writer, server)

    return handler


def huge(size: int) -> Handler:
    """A completion whose content is ``size`` bytes of text without spaces, sent in large pieces."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if not request.target.endswith("/chat/completions"):
            return await well_behaved(request, writer, server)
        body = json.dumps(completion("x" * size + " \\boxed{42}")).encode()
        writer.write(response(200, b"", {"Content-Length": str(len(body))}, length=False))
        for start in range(0, len(body), 1 << 20):
            writer.write(body[start:start + (1 << 20)])
            await writer.drain()
        return True

    return handler


def throttling(times: int, headers: dict[str, str]) -> Handler:
    """Answers the first ``times`` chat completions with 429 and ``headers`` (Retry-After...)."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if request.target.endswith("/chat/completions"):
            server.stamps.append(time.monotonic())
            if len(server.stamps) <= times:
                writer.write(response(429, b'{"error": {"message": "slow down", "code": 429}}', headers))
                await writer.drain()
                return True
        return await well_behaved(request, writer, server)

    return handler


# -- a forward HTTP proxy ------------------------------------------------------------------------------


@dataclass
class ForwardProxy(_Threaded):
    """An HTTP forward proxy (absolute-form requests) that reaches every host name as 127.0.0.1."""

    forwarded: list[str] = field(default_factory=list)

    def start(self) -> ForwardProxy:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    first, _, rest = head.partition(b"\r\n")
                    method, target, version = first.decode().split(" ", 2)
                    self.forwarded.append(target)
                    hostport, _, path = target.split("://", 1)[1].partition("/")
                    port = int(hostport.rsplit(":", 1)[1]) if ":" in hostport else 80
                    length = 0
                    for line in rest.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    body = await reader.readexactly(length)
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                    up_writer.write(f"{method} /{path} {version}\r\n".encode() + rest + body)
                    await up_writer.drain()
                    answer = await up_reader.readuntil(b"\r\n\r\n")
                    size = next((int(line.split(b":")[1]) for line in answer.split(b"\r\n")
                                 if line.lower().startswith(b"content-length:")), 0)
                    answer += await up_reader.readexactly(size)
                    up_writer.close()
                    writer.write(answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        self._serve(on_client)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
