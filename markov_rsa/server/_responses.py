"""Chat completion bodies and SSE frames in OpenAI's shapes."""

from __future__ import annotations

import inspect
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from .._events import Progress
from .._result import RSAResult
from .._types import Trace, Usage

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keepalive\n\n"


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return f"chatcmpl-{secrets.token_hex(12)}"


def sse(payload: dict[str, Any]) -> bytes:
    """One ``data:`` frame."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def rsa_block(result: RSAResult) -> dict[str, Any]:
    """The ``rsa`` object of a response: what the run did and what it cost.

    Carries the fields of Zyphra's proxy (``population``, ``rounds``, ``aggregation_size``,
    ``tail_tokens``, ``selection``, ``vote``, ``requests``) and the rest of the run's record.
    """
    p = result.params
    winner = result.votes[0][0] if result.votes else None
    return {
        "population": p.n,
        "rounds": p.t,
        "aggregation_size": p.k,
        "tail_tokens": p.tail_tokens,
        "selection": result.selection,
        "answer": result.answer,
        "votes": [list(v) for v in result.votes],
        "vote": {"winner": winner, "tally": dict(result.votes)} if result.votes else None,
        "requests": result.calls,
        "retries": result.retries,
        "failed": result.failed,
        "seed": result.seed,
        "tokenizer": result.tokenizer,
        "params": p.model_dump(mode="json"),
        "per_round": [r.to_dict() for r in result.rounds],
        "usage": result.usage.to_dict(),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "notes": list(result.notes),
        "stopped_early": result.stopped_early,
    }


def rsa_completion(result: RSAResult, model: str, cid: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` carrying the run's answer, usage summed over every call, and ``rsa``."""
    message: dict[str, Any] = {"role": "assistant", "content": result.final_text}
    if result.final_reasoning:
        message["reasoning"] = result.final_reasoning
    return {
        "id": cid or completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason or "stop", "logprobs": None}],
        "usage": result.usage.to_dict(),
        "rsa": rsa_block(result),
    }


def trace_completion(traces: list[Trace], model: str) -> dict[str, Any]:
    """A ``chat.completion`` of plain generations (one choice per trace), for backends with no upstream."""
    usage = Usage()
    choices = []
    for index, trace in enumerate(traces):
        usage.add(trace.usage)
        message: dict[str, Any] = {"role": "assistant", "content": trace.content}
        if trace.reasoning:
            message["reasoning"] = trace.reasoning
        choices.append({"index": index, "message": message, "finish_reason": trace.finish_reason or "stop", "logprobs": None})
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage.to_dict(),
    }


class ChunkWriter:
    """Frames of one streamed ``chat.completion.chunk`` response."""

    def __init__(self, model: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0, **extra: Any) -> bytes:
        """A frame with one choice."""
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra,
            }
        )

    def usage(self, usage: Usage, **extra: Any) -> bytes:
        """The usage frame of ``stream_options.include_usage`` (no choices)."""
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage.to_dict(),
                **extra,
            }
        )

    def progress(self, event_type: str, progress: Progress, population: int) -> bytes:
        """A progress frame: an empty delta (so naive clients see nothing) plus an ``rsa`` object."""
        data = progress.to_dict()
        data["elapsed_s"] = round(data["elapsed_s"], 3)
        data.update(
            event=event_type,
            population=population,
            tokens=progress.prompt_tokens + progress.completion_tokens,
        )
        return self.chunk({}, rsa=data)


class ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` once it is over, even when its body never started.

    A client that disconnects before the first frame leaves the body generator unstarted, so its
    ``finally`` never runs; whatever it holds (a run slot, an upstream connection) is released here.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None] | None],
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(content, status_code, headers=headers, media_type=media_type)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            outcome = self._on_close()
            if inspect.isawaitable(outcome):
                await outcome
