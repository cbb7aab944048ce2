"""Pass-through requests when there is no upstream to relay to (an in-process engine): plain generations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from .._backend import Backend
from .._errors import BackendError, ConfigError
from .._params import RSAParams
from .._types import GenerationRequest, Trace, Usage
from ._errors import APIError, upstream_error
from ._responses import DONE, ChunkWriter, trace_completion

_SAMPLING = ("stop", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _number(body: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number", param=name)
    return kind(value)


def generation_requests(body: dict[str, Any], defaults: RSAParams) -> list[GenerationRequest]:
    """The ``n`` generations a chat request asks for, sampling from the request or the server defaults."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of message objects", param="messages")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= 128:
        raise APIError(400, "'n' must be between 1 and 128", param="n")
    max_tokens = _number(body, "max_completion_tokens", None, int) or _number(body, "max_tokens", defaults.max_tokens, int)
    seed = _number(body, "seed", None, int)
    template = body.get("chat_template_kwargs")
    return [
        GenerationRequest(
            messages=[dict(m) for m in messages],
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", defaults.temperature, float),
            top_p=_number(body, "top_p", defaults.top_p, float),
            top_k=_number(body, "top_k", defaults.top_k, int),
            # Distinct seeds, or n choices of a seeded request would all be the same.
            seed=None if seed is None else seed + i,
            chat_template_kwargs=template if isinstance(template, dict) else None,
            extra={key: body[key] for key in _SAMPLING if key in body},
        )
        for i in range(n)
    ]


async def generate_all(backend: Backend, requests: list[GenerationRequest]) -> list[Trace]:
    """Every trace, in request order; the first failure is raised."""
    traces: list[Trace | None] = [None] * len(requests)
    async for index, outcome in backend.generate(requests):
        if isinstance(outcome, BackendError):
            raise outcome
        traces[index] = outcome
    return [t for t in traces if t is not None]


async def local_completion(backend: Backend, body: dict[str, Any], defaults: RSAParams, model: str) -> Response:
    """Answer a pass-through chat request with plain generations on ``backend``."""
    requests = generation_requests(body, defaults)
    try:
        traces = await generate_all(backend, requests)
    except BackendError as err:
        raise upstream_error(err) from None
    except ConfigError as err:
        raise APIError(400, str(err), param=err.param) from None
    completion = trace_completion(traces, model)
    if not body.get("stream"):
        return JSONResponse(completion)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    writer = ChunkWriter(model)

    async def frames() -> AsyncIterator[bytes]:
        for index, trace in enumerate(traces):
            delta: dict[str, Any] = {"role": "assistant", "content": trace.content}
            if trace.reasoning:
                delta["reasoning"] = trace.reasoning
            yield writer.chunk(delta, index=index)
            yield writer.chunk({}, trace.finish_reason or "stop", index=index)
        if include_usage:
            usage = Usage()
            for trace in traces:
                usage.add(trace.usage)
            yield writer.usage(usage)
        yield DONE

    return StreamingResponse(frames(), media_type="text/event-stream")
