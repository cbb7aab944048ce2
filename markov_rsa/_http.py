"""The OpenAI-compatible HTTP backend: vLLM first, also SGLang, llama.cpp's server and OpenAI.

All HTTP goes through :mod:`markov_rsa.upstream`; this module knows chat completions, streams and
tokenizers, not connections.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from fractions import Fraction
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from asyncio_throttle import Throttler

from ._backend import Outcome
from ._errors import BackendError, ConfigError, ErrorKind
from ._routing import UpstreamPool, check_url
from ._tokenizers import Tokenizer, local_tokenizer, tiktoken_tokenizer
from ._types import GenerationRequest, Trace, Usage
from .upstream import (
    DEFAULT_MAX_RESPONSE_BYTES,
    RETRY_STATUSES,
    RetryPolicy,
    UpstreamClient,
    UpstreamResponse,
    discover_tokenizer,
    dump_json,
    error_message,
    load_json,
    parse_json,
    status_error,
)

T = TypeVar("T")
logger = logging.getLogger("markov_rsa")

# Fields beyond OpenAI's that some servers reject; when one is named in a 400, it is dropped for
# the rest of this backend's life instead of failing every call.
OPTIONAL_FIELDS = ("return_token_ids", "top_k", "chat_template_kwargs", "seed")
_INLINE_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_REJECTION_WORDS = ("unrecognized", "unrecognised", "unknown", "unsupported", "not supported", "extra",
                    "not permitted", "not allowed", "unexpected", "invalid field")


def parse_choice(choice: dict[str, Any]) -> tuple[str, str]:
    """``(reasoning, content)`` of a choice, whichever field the server put the reasoning in."""
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
    if not reasoning:
        match = _INLINE_THINK.match(content)
        if match:
            reasoning, content = match.group(1).strip(), content[match.end() :]
    return reasoning, content


DeltaHandler = Callable[[str, str], Awaitable[None] | None]
"""Receives each streamed piece of a completion as ``(content, reasoning)``."""


class _StreamState:
    """What a streamed completion has produced so far."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.content = ""
        self.reasoning = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.relayed = False

    async def take(self, chunk: dict[str, Any], on_delta: DeltaHandler) -> None:
        if chunk.get("usage"):
            self.usage = Usage.from_dict(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            thought = delta.get("reasoning") or delta.get("reasoning_content") or ""
            ids = choice.get("token_ids")
            if isinstance(ids, list):
                self.token_ids.extend(int(t) for t in ids)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if text or thought:
                self.content += text
                self.reasoning += thought
                self.relayed = True
                outcome = on_delta(text, thought)
                if inspect.isawaitable(outcome):
                    await outcome


def rate_throttler(requests_per_second: float) -> Throttler:
    """A throttle of ``requests_per_second`` on average, fractions included.

    asyncio-throttle counts whole starts in a sliding window, so the rate is written as starts per
    window: 0.5/s is 1 per 2 s, 1.5/s is 3 per 2 s, 2.7/s is 27 per 10 s; from 10/s on, whole
    starts per second (within 5 %), so that a window never lets a long burst through.
    """
    if requests_per_second < 1:
        return Throttler(rate_limit=1, period=1.0 / requests_per_second)
    rate = Fraction(requests_per_second).limit_denominator(10 if requests_per_second < 10 else 1)
    return Throttler(rate_limit=rate.numerator, period=float(rate.denominator))


class OpenAIBackend:
    """Rollouts over any OpenAI-compatible chat completions endpoint.

    ``base_url`` is one server's OpenAI base URL, an :class:`UpstreamPool` of replicas (each
    attempt goes to the pool's choice, so a retry lands on another replica), or a shared
    :class:`UpstreamClient` (the proxy's, which this backend then does not close).

    Retries connection failures, timeouts, broken answers, 408/409/425/429 and 5xx under one
    :class:`RetryPolicy` (honouring ``Retry-After``), never other 4xx. ``timeout`` is the total
    deadline of one call, ``idle_timeout`` the longest silence inside a body, ``max_response_bytes``
    the largest answer read. ``concurrency`` caps requests in flight; ``requests_per_second``
    optionally limits the rate. A request whose ``extra`` carries a ``model`` asks for that model.
    """

    def __init__(
        self,
        base_url: str | UpstreamPool | UpstreamClient,
        model: str | None = None,
        api_key: str | None = None,
        *,
        concurrency: int | None = None,
        requests_per_second: float | None = None,
        timeout: float = 900.0,
        idle_timeout: float | None = None,
        connect_timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        tokenizer: str | None = None,
        return_token_ids: bool = True,
        headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if api_key is not None and not api_key.isascii():
            raise ConfigError("the API key must be ASCII text", param="api_key")
        if concurrency is not None and concurrency < 1:
            raise ConfigError("concurrency must be at least 1", param="concurrency")
        if timeout <= 0:
            raise ConfigError("the timeout must be positive", param="timeout")
        if max_response_bytes < 1:
            raise ConfigError("max_response_bytes must be positive", param="max_response_bytes")
        if isinstance(base_url, UpstreamClient):
            self.client, self._owns_client = base_url, False
        else:
            pool = base_url if isinstance(base_url, UpstreamPool) else UpstreamPool(
                [check_url(base_url)], per_upstream_concurrency=concurrency or 64
            )
            self.client = UpstreamClient(
                pool,
                api_key=api_key,
                headers=headers,
                timeout=timeout,
                idle_timeout=idle_timeout,
                connect_timeout=connect_timeout,
                max_response_bytes=max_response_bytes,
            )
            self._owns_client = True
        pool = self.client.pool
        self.base_url = pool.upstreams[0].base_url
        self.name = ", ".join(u.base_url for u in pool.upstreams)
        self.model = model
        self.retry = RetryPolicy(max_retries, backoff_base, backoff_max)
        self.extra_body = dict(extra_body or {})
        self._tokenizer_path = tokenizer
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_lock = asyncio.Lock()
        self._model_lock = asyncio.Lock()
        self._context_lengths: dict[str, int | None] = {}
        self._dropped: set[str] = set() if return_token_ids else {"return_token_ids"}
        self._semaphore = asyncio.Semaphore(concurrency or pool.per_upstream_concurrency * len(pool.upstreams))
        if requests_per_second is not None and requests_per_second <= 0:
            raise ConfigError("requests per second must be positive", param="rps")
        self._throttler = rate_throttler(requests_per_second) if requests_per_second else None

    @property
    def dropped_fields(self) -> frozenset[str]:
        """Optional request fields this backend stopped sending because the server rejected them."""
        return frozenset(self._dropped)

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (unless the client is shared)."""
        if self._owns_client:
            await self.client.aclose()

    # -- plumbing ---------------------------------------------------------------------------------

    async def resolve_model(self) -> str:
        """The model to ask for: the configured one, else the first the server lists."""
        if self.model:
            return self.model
        async with self._model_lock:
            if not self.model:
                data = await self.client.request_json("GET", "/models", timeout=30.0)
                models = data.get("data") if isinstance(data, dict) else None
                if not models or not isinstance(models[0], dict) or "id" not in models[0]:
                    raise BackendError("the server lists no model at /models; pass --model", kind=ErrorKind.protocol)
                self.model = str(models[0]["id"])
        return self.model

    async def context_length(self) -> int | None:
        """The model's context length as the server lists it (vLLM's ``max_model_len`` in
        ``/v1/models``), or None when it does not say."""
        model = await self.resolve_model()
        if model not in self._context_lengths:
            try:
                data = await self.client.request_json("GET", "/models", timeout=30.0)
                entries = [m for m in data.get("data") or [] if isinstance(m, dict)]
            except (BackendError, AttributeError):
                entries = []
            entry = next((m for m in entries if m.get("id") == model), None)
            found = entry.get("max_model_len") if entry else None
            self._context_lengths[model] = found if isinstance(found, int) and found > 0 else None
        return self._context_lengths[model]

    async def with_retries(self, call: Callable[[], Awaitable[T]], *, limited: bool = True,
                           may_retry: Callable[[], bool] = lambda: True) -> tuple[T, int]:
        """``(result, attempts)`` of ``call`` under the retry policy; ``limited`` calls also take a
        concurrency slot and respect the rate limit. Raises the last :class:`BackendError`."""
        if not limited:
            return await self.retry.call(call, may_retry)

        async def slot() -> T:
            async with self._semaphore:
                if self._throttler is not None:
                    async with self._throttler:
                        pass
                return await call()

        return await self.retry.call(slot, may_retry)

    # -- generation -------------------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        requested = request.extra.get("model")
        payload: dict[str, Any] = {
            **self.extra_body,
            **request.extra,
            "model": requested if isinstance(requested, str) and requested else model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": 1,
            "return_token_ids": True,
        }
        if request.top_k is not None:
            payload["top_k"] = request.top_k
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.chat_template_kwargs:
            payload["chat_template_kwargs"] = request.chat_template_kwargs
        for name in self._dropped:
            payload.pop(name, None)
        return payload

    def _rejected_field(self, err: BackendError, payload: dict[str, Any]) -> str | None:
        """The optional field a 400/422 complains about, if any (the server named it)."""
        if err.status not in (400, 422):
            return None
        text = error_message(err.body).lower() if err.body is not None else str(err).lower()
        # Only a complaint about the field itself, not about its value (a bad seed must not be dropped).
        if not any(word in text for word in _REJECTION_WORDS):
            return None
        return next((f for f in OPTIONAL_FIELDS if f in payload and f in text), None)

    async def _without_rejected_fields(self, request: GenerationRequest, send: Callable[[dict[str, Any]], Awaitable[T]],
                                       may_drop: Callable[[], bool] = lambda: True) -> T:
        """``send(payload)``, sent again without an optional field the server refused."""
        model = await self.resolve_model()
        while True:
            payload = self._payload(request, model)
            try:
                return await send(payload)
            except BackendError as err:
                field = self._rejected_field(err, payload) if may_drop() else None
                if field is None:
                    raise
                self._dropped.add(field)

    async def _complete_once(self, request: GenerationRequest) -> dict[str, Any]:
        return await self._without_rejected_fields(  # type: ignore[no-any-return]
            request, lambda payload: self.client.request_json("POST", "/chat/completions", payload)
        )

    async def complete(self, request: GenerationRequest) -> Trace:
        """One rollout, with retries. Raises :class:`BackendError` when it fails for good."""
        started = time.perf_counter()
        data, attempts = await self.with_retries(lambda: self._complete_once(request))
        try:
            choice = data["choices"][0]
            reasoning, content = parse_choice(choice)
            ids = choice.get("token_ids")
            return Trace(
                content=content,
                reasoning=reasoning,
                # Kept as sent: converting thousands of ids per call costs more than the rest of
                # the parse; the tail checks the slice it decodes (see make_tail).
                token_ids=ids if isinstance(ids, list) else None,
                finish_reason=choice.get("finish_reason"),
                usage=Usage.from_dict(data.get("usage")),
                attempts=attempts,
                latency_s=time.perf_counter() - started,
                raw=choice.get("message"),
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise BackendError(
                f"unexpected chat completion response ({type(err).__name__}): {str(data)[:200]}",
                kind=ErrorKind.protocol,
                attempts=attempts,
            ) from None

    async def stream_complete(self, request: GenerationRequest, on_delta: DeltaHandler) -> Trace:
        """One rollout streamed: ``on_delta(content, reasoning)`` is called with each piece as it arrives.

        Retried like :meth:`complete` until the first piece was handed over; after that a failure
        is final, since the receiver already holds part of the text. A stream that ends without a
        finished completion is a failure, never an empty success. Raises :class:`BackendError`.
        """
        started = time.perf_counter()
        state = _StreamState()

        async def attempt() -> None:
            state.reset()
            await self._without_rejected_fields(
                request,
                lambda payload: self._read_stream(
                    {**payload, "stream": True, "stream_options": {"include_usage": True}}, on_delta, state
                ),
                may_drop=lambda: not state.relayed,
            )

        _, attempts = await self.with_retries(attempt, may_retry=lambda: not state.relayed)
        reasoning, content = parse_choice({"message": {"content": state.content, "reasoning": state.reasoning}})
        return Trace(
            content=content,
            reasoning=reasoning,
            token_ids=state.token_ids or None,
            finish_reason=state.finish_reason,
            usage=state.usage,
            attempts=attempts,
            latency_s=time.perf_counter() - started,
            raw={"role": "assistant", "content": state.content, "reasoning": state.reasoning},
        )

    async def _read_stream(self, payload: dict[str, Any], on_delta: DeltaHandler, state: _StreamState) -> None:
        response = await self.client.open(
            "POST", "/chat/completions", content=dump_json(payload),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        async with response:
            where = response.where
            if response.status >= 400:
                raw = await response.read()
                try:
                    body: Any = await parse_json(raw)
                except ValueError:
                    body = None
                raise status_error(where, response.status, raw, body, response.headers)
            if response.content_type != "text/event-stream":
                raise BackendError(f"{where}: answered a stream request with {response.content_type or 'no content type'}, "
                                   "not an event stream", kind=ErrorKind.protocol, retriable=True)
            done = await self._read_events(response, where, on_delta, state)
            if state.finish_reason is None and not (done and state.relayed):
                raise BackendError(f"{where}: the stream ended without a finished completion",
                                   kind=ErrorKind.protocol, retriable=True)

    async def _read_events(self, response: UpstreamResponse, where: str, on_delta: DeltaHandler,
                           state: _StreamState) -> bool:
        """Hand each event's pieces to ``state``; True when the stream ended with ``[DONE]``."""
        pending = bytearray()
        async for piece in response.iter_bytes():
            pending += piece
            if b"\n" not in piece:
                continue
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return True
                try:
                    chunk = load_json(data)
                except ValueError:
                    raise BackendError(f"{where}: malformed JSON in the stream: {data[:120]!r}",
                                       kind=ErrorKind.protocol, retriable=True) from None
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"]
                    code = err.get("code") if isinstance(err, dict) else None
                    status = code if isinstance(code, int) else None
                    raise BackendError(
                        f"{where} failed mid-stream: {error_message(chunk)}",
                        kind=ErrorKind.status if status is not None else ErrorKind.protocol,
                        status=status,
                        retriable=status is None or status in RETRY_STATUSES,
                        body=chunk,
                    )
                if isinstance(chunk, dict):
                    await state.take(chunk, on_delta)
        return False

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[tuple[int, Outcome]]:
        """Run all requests concurrently (up to the cap); yield each outcome as it lands."""
        queue: asyncio.Queue[tuple[int, Outcome]] = asyncio.Queue()

        async def run(index: int, request: GenerationRequest) -> None:
            try:
                outcome: Outcome = await self.complete(request)
            except BackendError as err:
                outcome = err
            except Exception as err:  # noqa: BLE001 - one broken rollout must not hang the batch
                outcome = BackendError(f"{type(err).__name__}: {err}")
            queue.put_nowait((index, outcome))

        tasks = [asyncio.create_task(run(i, r)) for i, r in enumerate(requests)]
        try:
            for _ in tasks:
                yield await queue.get()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- tokenizer --------------------------------------------------------------------------------

    async def get_tokenizer(self) -> Tokenizer:
        """The server's own tokenizer when it has one, else a local tokenizer file, else tiktoken
        (an approximation, said once in the log)."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = await self._find_tokenizer()
        return self._tokenizer

    async def _find_tokenizer(self) -> Tokenizer:
        async def retried(call: Callable[[], Awaitable[Any]]) -> Any:
            result, _ = await self.with_retries(call, limited=False)
            return result

        remote = await discover_tokenizer(self.client, self.resolve_model, retried)
        if remote is not None:
            return remote
        if self._tokenizer_path:
            return local_tokenizer(self._tokenizer_path)
        fallback = await asyncio.to_thread(tiktoken_tokenizer)  # reading the encoding takes a while
        logger.warning(
            "%s: the server has no tokenize endpoint and no --tokenizer was given: tails are cut with %s, "
            "kept a safety margin under tail_tokens", self.name, fallback.name,
        )
        return fallback
