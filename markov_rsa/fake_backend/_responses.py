"""Answering a generation over time: queueing, latency, streaming, injected faults, cancellation."""

from __future__ import annotations

import asyncio
import codecs
import json
import random
from typing import Any, Literal

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ._generation import Choice, Job, Mode
from ._solver import encoding
from ._state import ServerState, SimulatedDrop

_HANG_S = 3600.0
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape, ``code`` being the HTTP status."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def fault_response(kind: str, number: int, seed: int) -> JSONResponse:
    """The answer of an injected 429 or 5xx fault (500 or 503, drawn from the seed)."""
    if kind == "429":
        return error_response(
            429,
            "Rate limit reached (simulated); retry shortly.",
            kind="rate_limit_error",
            headers={"retry-after-ms": "20"},
        )
    status = 503 if random.Random(f"status:{seed}:{number}").random() < 0.5 else 500
    return error_response(
        status, "The server had an error while processing the request (simulated).", kind="server_error"
    )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Call:
    """Waits of one request that end early when its client leaves or the server shuts down."""

    def __init__(self, state: ServerState, receive: Receive) -> None:
        self.state = state
        self.receive = receive
        self.loop = asyncio.get_running_loop()
        self.watcher: asyncio.Task[None] | None = None
        self.ended: Literal["disconnect", "closing"] | None = None

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def race(self, future: asyncio.Future[Any]) -> bool:
        """Wait for ``future``; False if the client disconnected or the server closed first."""
        if self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch())
        closing = self.state.closing
        assert closing is not None
        if self.watcher.done() or closing.done():
            self.ended = "closing" if closing.done() else "disconnect"
            return False
        done, _ = await asyncio.wait((future, self.watcher, closing), return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return True
        self.ended = "closing" if closing.done() else "disconnect"
        return False

    async def sleep_until(self, deadline: float) -> bool:
        """Sleep until loop time ``deadline``; False if interrupted."""
        delay = deadline - self.loop.time()
        if delay <= 0:
            return not self.interrupted()
        future: asyncio.Future[None] = self.loop.create_future()
        handle = self.loop.call_later(delay, _resolve, future)
        if await self.race(future):
            return True
        handle.cancel()
        return False

    def interrupted(self) -> bool:
        """Whether the client left or the server is closing (as far as known without waiting)."""
        closing = self.state.closing
        if closing is not None and closing.done():
            self.ended = "closing"
        elif self.watcher is not None and self.watcher.done():
            self.ended = "disconnect"
        return self.ended is not None

    async def acquire(self) -> bool:
        """Take a generation slot, in arrival order; False if interrupted while queued."""
        semaphore = self.state.semaphore
        if semaphore is None:
            return True
        if not semaphore.locked():
            await semaphore.acquire()  # free slot: returns without suspending
            return True
        task = asyncio.ensure_future(semaphore.acquire())
        if await self.race(task):
            return True
        task.cancel()
        got: bool
        try:
            got = await task
        except asyncio.CancelledError:
            got = False
        if got:
            semaphore.release()
        return False

    def close(self) -> None:
        """Stop watching for a disconnect (the response is over)."""
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _sse(data: Any) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"


class CompletionResponse(Response):
    """A generation answered over time: queueing, latency, streaming, injected faults, cancellation."""

    def __init__(self, state: ServerState, job: Job | None, fault: str | None, stream: bool) -> None:
        # Response.__init__ is bypassed on purpose: the body is produced in __call__.
        self.state = state
        self.job = job
        self.fault = fault
        self.stream = stream
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        call = _Call(state, receive)
        try:
            if self.fault == "hang":
                await call.sleep_until(call.loop.time() + _HANG_S)
                if call.ended == "closing":
                    await self._closing(send, started=False)
                else:
                    state.stats.cancelled += 1
                return
            if self.fault == "drop":
                await self._drop(send)
            if self.fault == "malformed":
                await self._malformed(send)
                return
            assert self.job is not None
            if self.job.stream:
                await self._stream(call, send, self.job)
            else:
                await self._respond(call, send, self.job)
        finally:
            call.close()

    async def _closing(self, send: Send, started: bool) -> None:
        if started:
            raise SimulatedDrop("server shutting down")
        body = _dumps(
            {"error": {"message": "The server is shutting down.", "type": "server_error", "param": None, "code": 503}}
        )
        await send(
            {"type": "http.response.start", "status": 503, "headers": [*_JSON_HEADERS, (b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": body})

    async def _drop(self, send: Send) -> None:
        if self.stream:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            partial = b'data: {"id":"chatcmpl-dropped","object":"chat.completion.chunk","choices":[{"index":0,'
            await send({"type": "http.response.body", "body": partial, "more_body": True})
        else:
            partial = b'{"id":"chatcmpl-dropped","object":"chat.completion","choices":[{"index":0,"message":'
            headers = [*_JSON_HEADERS, (b"content-length", str(len(partial) * 4).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": partial, "more_body": True})
        raise SimulatedDrop("simulated connection drop")

    async def _malformed(self, send: Send) -> None:
        broken = b'{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index":0,"message":{"con'
        if self.stream:
            body = b"data: " + broken + b"\n\ndata: [DONE]\n\n"
            headers = _SSE_HEADERS
        else:
            body = broken
            headers = _JSON_HEADERS
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _generation_slot(self, call: _Call) -> float | None:
        """Queue for a slot; the loop time generation starts, or None if interrupted."""
        if not await call.acquire():
            return None
        stats = self.state.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        return call.loop.time()

    def _release_slot(self) -> None:
        self.state.stats.in_flight -= 1
        if self.state.semaphore is not None:
            self.state.semaphore.release()

    def _served(self, job: Job) -> None:
        stats = self.state.stats
        stats.served += 1
        for key, value in job.usage().items():
            stats.usage[key] += value

    def _interrupted(self, call: _Call) -> None:
        if call.ended == "disconnect":
            self.state.stats.cancelled += 1

    async def _respond(self, call: _Call, send: Send, job: Job) -> None:
        config = self.state.config
        rate = config.tokens_per_second
        longest = max(len(c.ids) for c in job.choices)
        duration = config.ttft_s + (longest / rate if rate > 0 else 0.0)
        start = await self._generation_slot(call)
        if start is None:
            self._interrupted(call)
            if call.ended == "closing":
                await self._closing(send, started=False)
            return
        try:
            finished = await call.sleep_until(start + duration) if duration > 0 else True
        finally:
            self._release_slot()
        if not finished:
            self._interrupted(call)
            if call.ended == "closing":
                await self._closing(send, started=False)
            return
        body = _dumps(full_body(job))
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        # Counted before the body goes out: a client holding the response must find it in the stats.
        self._served(job)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, call: _Call, send: Send, job: Job) -> None:
        config = self.state.config
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        start = await self._generation_slot(call)
        if start is None:
            self._interrupted(call)
            if call.ended == "closing":
                raise SimulatedDrop("server shutting down")
            return
        try:
            ok = await self._emit(call, send, job, start + config.ttft_s, config.tokens_per_second)
        finally:
            self._release_slot()
        if not ok:
            self._interrupted(call)
            if call.ended == "closing":
                raise SimulatedDrop("server shutting down")
            return
        tail = b""
        if job.include_usage:
            tail += _sse(_chunk(job, [], usage=job.usage()))
        tail += b"data: [DONE]\n\n"
        self._served(job)
        await send({"type": "http.response.body", "body": tail})

    async def _emit(self, call: _Call, send: Send, job: Job, first_token_at: float, rate: float) -> bool:
        """Send every choice's deltas at the times its tokens are produced; False if interrupted."""
        events = sorted(_stream_events(job, rate), key=lambda e: (e[0], e[1]))
        pending: list[bytes] = []
        for offset, _, frame in events:
            deadline = first_token_at + offset
            if deadline > call.loop.time():
                if pending:
                    await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
                    pending = []
                if not await call.sleep_until(deadline):
                    return False
            elif call.interrupted():
                return False
            pending.append(frame)
        if pending:
            await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
        return not call.interrupted()


def _message(choice: Choice, mode: Mode) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.content}
    if mode in ("reasoning", "reasoning_content"):
        message[mode] = choice.reasoning
    return message


def full_body(job: Job) -> dict[str, Any]:
    """The non-streamed response body of a job."""
    choices = []
    for index, choice in enumerate(job.choices):
        entry: dict[str, Any] = {"index": index}
        if job.kind == "chat":
            entry["message"] = _message(choice, job.mode)
        else:
            entry["text"] = choice.text
        entry["logprobs"] = None
        entry["finish_reason"] = choice.finish_reason
        entry["stop_reason"] = None
        if job.return_ids:
            entry["token_ids"] = choice.ids
        choices.append(entry)
    body: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": job.usage(),
    }
    if job.return_ids:
        body["prompt_token_ids"] = job.prompt_ids
    return body


def _chunk(job: Job, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _group_size(rate: float) -> int:
    # 8-16 tokens a chunk at ordinary rates; bigger at very high rates so the chunk count per second
    # (and the server's CPU per stream) stays bounded.
    if rate <= 0:
        return 16
    return max(8, min(64, int(rate / 100)))


def _stream_events(job: Job, rate: float) -> list[tuple[float, int, bytes]]:
    """(seconds after the first token, choice index, SSE frame) for every chunk of every choice."""
    enc = encoding()
    size = _group_size(rate)
    events: list[tuple[float, int, bytes]] = []
    for index, choice in enumerate(job.choices):
        if job.kind == "chat":
            role = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            events.append((0.0, index, _sse(_chunk(job, [role]))))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        position = 0
        total = len(choice.ids)
        r_start, r_end = choice.reasoning_span
        c_start = choice.content_start
        for begin in range(0, max(total, 1), size):
            end = min(begin + size, total)
            group = choice.ids[begin:end]
            piece = decoder.decode(enc.decode_bytes(group), final=end >= total)
            s, e = position, position + len(piece)
            position = e
            entry: dict[str, Any] = {"index": index}
            if job.kind == "chat":
                delta: dict[str, Any] = {}
                if job.mode in ("reasoning", "reasoning_content"):
                    lo, hi = max(s, r_start), min(e, r_end)
                    if lo < hi:
                        delta[job.mode] = choice.text[lo:hi]
                    if c_start is not None and e > c_start:
                        delta["content"] = choice.text[max(s, c_start) : e]
                else:
                    delta["content"] = piece
                entry["delta"] = delta
            else:
                entry["text"] = piece
            entry["logprobs"] = None
            entry["finish_reason"] = choice.finish_reason if end >= total else None
            if job.return_ids:
                entry["token_ids"] = group
            at = end / rate if rate > 0 else 0.0
            events.append((at, index, _sse(_chunk(job, [entry]))))
    return events
