"""The OpenAI-compatible HTTP backend: vLLM first, also SGLang, llama.cpp's server and OpenAI."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from urllib.parse import urlsplit
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
from asyncio_throttle import Throttler
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ._backend import Outcome
from ._errors import BackendError, ConfigError
from ._tokenizers import Tokenizer, local_tokenizer, tiktoken_tokenizer
from ._transport import (
    LeanTransport,
    OriginPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ._types import GenerationRequest, Trace, Usage

T = TypeVar("T")

# Fields beyond OpenAI's that some servers reject; when one is named in a 400, it is dropped for
# the rest of this backend's life instead of failing every call.
OPTIONAL_FIELDS = ("return_token_ids", "top_k", "chat_template_kwargs", "seed")
_INLINE_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_REJECTION_WORDS = ("unrecognized", "unrecognised", "unknown", "unsupported", "not supported", "extra",
                    "not permitted", "not allowed", "unexpected", "invalid field")
_RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def error_message(body: Any) -> str:
    """The message of an error body in any of the shapes servers use (OpenAI, SGLang, bare strings)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or json.dumps(err)[:300])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]


def status_error(url: str, status: int, raw: bytes, body: Any) -> BackendError:
    """The error of an HTTP error status; retriable for 408, 409, 425, 429 and 5xx."""
    detail = error_message(body) if body is not None else raw[:300].decode(errors="replace")
    return BackendError(f"{url} returned {status}: {detail}", status=status, retriable=status in _RETRY_STATUSES, body=body)


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


def root_url(base_url: str) -> str:
    """The server root of an OpenAI base URL (``http://h:8000/v1`` -> ``http://h:8000``)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


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


class RemoteTokenizer:
    """The server's own ``/tokenize`` and ``/detokenize`` (vLLM, SGLang, llama.cpp shapes)."""

    exact = True
    decodes_backend_ids = True

    def __init__(self, backend: OpenAIBackend, tokenize_url: str, detokenize_url: str) -> None:
        self._backend = backend
        self._tokenize_url = tokenize_url
        self._detokenize_url = detokenize_url
        self.name = f"remote:{tokenize_url}"

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` from the server."""
        data = await self._backend._post_json_retried(
            self._tokenize_url,
            {
                "model": await self._backend.resolve_model(),
                "prompt": text,
                "content": text,
                "add_special_tokens": False,
                "add_special": False,
            },
        )
        return [int(t) for t in data["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` from the server."""
        data = await self._backend._post_json_retried(
            self._detokenize_url, {"model": await self._backend.resolve_model(), "tokens": ids}
        )
        for key in ("prompt", "text", "content"):
            if isinstance(data.get(key), str):
                return str(data[key])
        raise BackendError(f"unexpected /detokenize response: {str(data)[:200]}")


class OpenAIBackend:
    """Rollouts over any OpenAI-compatible chat completions endpoint.

    Retries connection errors, timeouts, 429 and 5xx with exponential backoff and jitter, never other
    4xx. ``concurrency`` caps requests in flight; ``requests_per_second`` optionally limits the rate.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        concurrency: int = 64,
        requests_per_second: float | None = None,
        timeout: float = 900.0,
        connect_timeout: float = 10.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        tokenizer: str | None = None,
        return_token_ids: bool = True,
        headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"backend URL must start with http:// or https://, got {base_url!r}", param="backend")
        try:
            parsed = httpx.URL(base_url)
        except (httpx.InvalidURL, ValueError) as err:
            raise ConfigError(f"invalid backend URL {base_url!r}: {err}", param="backend") from None
        if not parsed.host or (parsed.port is not None and not 0 < parsed.port < 65536):
            raise ConfigError(f"invalid backend URL {base_url!r}: no host, or a port out of range", param="backend")
        if api_key is not None and not api_key.isascii():
            raise ConfigError("the API key must be ASCII text", param="api_key")
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1", param="concurrency")
        self.base_url = base_url.rstrip("/")
        self.name = self.base_url
        self.model = model
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self._tokenizer_path = tokenizer
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_lock = asyncio.Lock()
        self._model_lock = asyncio.Lock()
        self._dropped: set[str] = set() if return_token_ids else {"return_token_ids"}
        self._semaphore = asyncio.Semaphore(concurrency)
        if requests_per_second is not None and requests_per_second <= 0:
            raise ConfigError("requests per second must be positive", param="rps")
        self._throttler = (
            # Below one request a second, one request per 1/rps seconds.
            Throttler(rate_limit=max(1, int(requests_per_second)), period=max(1.0, 1.0 / requests_per_second))
            if requests_per_second
            else None
        )
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.connect_timeout = connect_timeout
        self._pools: dict[str, OriginPool] = {}
        self._targets: dict[str, tuple[OriginPool, str]] = {}
        block = "".join(f"{name}: {value}\r\n" for name, value in {**auth, **(headers or {})}.items())
        self._plain_headers = (block + "Accept: application/json\r\n").encode("latin-1")
        self._json_headers = self._plain_headers + b"Content-Type: application/json\r\n"
        self._client = httpx.AsyncClient(
            headers={**auth, **(headers or {})},
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=LeanTransport(max_idle_per_origin=concurrency + 8),
        )

    @property
    def dropped_fields(self) -> frozenset[str]:
        """Optional request fields this backend stopped sending because the server rejected them."""
        return frozenset(self._dropped)

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._client.aclose()
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()
        self._targets.clear()

    # -- plumbing ---------------------------------------------------------------------------------

    def _target(self, url: str) -> tuple[OriginPool, str]:
        """The pool of a URL's origin and the request target, parsed once per URL."""
        known = self._targets.get(url)
        if known is None:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
            pool = self._pools.get(origin)
            if pool is None:
                pool = self._pools[origin] = OriginPool(origin, connect_timeout=self.connect_timeout)
            known = self._targets[url] = (pool, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        return known

    async def _send(self, method: str, url: str, payload: Any | None = None, timeout: float | None = None) -> Any:
        """One HTTP exchange; maps every failure to a :class:`BackendError` that says if it may be retried.

        JSON calls go straight to the keep-alive pool: httpx's request and response objects would
        cost more CPU than everything else a rollout needs on this side.
        """
        pool, target = self._target(url)
        data = json.dumps(payload).encode() if payload is not None else b""
        headers = self._json_headers if payload is not None else self._plain_headers
        try:
            response = await pool.request(method, target, headers, data, timeout=timeout or self.timeout)
            raw = await response.read()
        except UpstreamTimeout as err:
            raise BackendError(f"{url}: timed out ({err})", retriable=True, timeout=True) from None
        except (UpstreamConnectError, UpstreamProtocolError) as err:
            raise BackendError(f"{url}: connection failed ({type(err).__name__}: {err})", retriable=True) from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if response.status >= 400:
            raise status_error(url, response.status, raw, body)
        if body is None:
            raise BackendError(f"{url}: malformed JSON in response: {raw[:120]!r}", retriable=True)
        return body

    async def _post_json(self, url: str, payload: dict[str, Any]) -> Any:
        return await self._send("POST", url, payload, timeout=min(self.timeout, 60.0))

    async def _post_json_retried(self, url: str, payload: dict[str, Any]) -> Any:
        if self._tokenizer is None:
            # Still probing which endpoint exists: a failure means "not this one", not "try again".
            return await self._post_json(url, payload)
        result, _ = await self.with_retries(lambda: self._post_json(url, payload), limited=False)
        return result

    async def resolve_model(self) -> str:
        """The model to ask for: the configured one, else the first the server lists."""
        if self.model:
            return self.model
        async with self._model_lock:
            if not self.model:
                data = await self._send("GET", f"{self.base_url}/models", timeout=min(self.timeout, 30.0))
                models = data.get("data") or []
                if not models:
                    raise BackendError(f"{self.base_url}/models lists no model; pass --model")
                self.model = str(models[0]["id"])
        return self.model

    # -- generation -------------------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            **self.extra_body,
            **request.extra,
            "model": model,
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
        if err.status not in (400, 422):
            return None
        text = str(err).lower()
        # Only a complaint about the field itself, not about its value (a bad seed must not be dropped).
        if not any(word in text for word in _REJECTION_WORDS):
            return None
        return next((f for f in OPTIONAL_FIELDS if f in payload and f in text), None)

    async def _complete_once(self, request: GenerationRequest) -> dict[str, Any]:
        model = await self.resolve_model()
        while True:
            payload = self._payload(request, model)
            try:
                return await self._send("POST", f"{self.base_url}/chat/completions", payload)  # type: ignore[no-any-return]
            except BackendError as err:
                field = self._rejected_field(err, payload)
                if field is None:
                    raise
                self._dropped.add(field)

    def _retrying(self, may_retry: Callable[[], bool] = lambda: True) -> AsyncRetrying:
        """The retry policy: retriable failures only, exponential backoff with jitter."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_max),
            retry=retry_if_exception(lambda e: isinstance(e, BackendError) and e.retriable and may_retry()),
            reraise=True,
        )

    async def with_retries(self, call: Callable[[], Awaitable[T]], *, limited: bool = True,
                           may_retry: Callable[[], bool] = lambda: True) -> tuple[T, int]:
        """``(result, attempts)`` of ``call`` under the retry policy; ``limited`` calls also take a
        concurrency slot and respect the rate limit. Raises the last :class:`BackendError`."""
        attempts = 0
        try:
            async for attempt in self._retrying(may_retry):
                with attempt:
                    attempts += 1
                    if not limited:
                        return await call(), attempts
                    async with self._semaphore:
                        if self._throttler is not None:
                            async with self._throttler:
                                pass
                        return await call(), attempts
        except BackendError as err:
            err.attempts = attempts
            raise
        raise BackendError("no attempt was made")  # unreachable: tenacity always makes one

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
                token_ids=[int(t) for t in ids] if isinstance(ids, list) else None,
                finish_reason=choice.get("finish_reason"),
                usage=Usage.from_dict(data.get("usage")),
                attempts=attempts,
                latency_s=time.perf_counter() - started,
                raw=choice.get("message"),
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise BackendError(
                f"unexpected chat completion response ({type(err).__name__}): {str(data)[:200]}", attempts=attempts
            ) from None

    async def stream_complete(self, request: GenerationRequest, on_delta: DeltaHandler) -> Trace:
        """One rollout streamed: ``on_delta(content, reasoning)`` is called with each piece as it arrives.

        Retried like :meth:`complete` until the first piece was handed over; after that a failure
        is final, since the receiver already holds part of the text. Raises :class:`BackendError`.
        """
        started = time.perf_counter()
        state = _StreamState()

        async def attempt() -> None:
            state.reset()
            await self._stream_once(request, on_delta, state)

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

    async def _stream_once(
        self, request: GenerationRequest, on_delta: DeltaHandler, state: _StreamState, url: str | None = None
    ) -> None:
        model = await self.resolve_model()
        target = url or f"{self.base_url}/chat/completions"
        while True:
            payload = {**self._payload(request, model), "stream": True, "stream_options": {"include_usage": True}}
            try:
                await self._read_stream(target, payload, on_delta, state)
                return
            except BackendError as err:
                field = None if state.relayed else self._rejected_field(err, payload)
                if field is None:
                    raise
                self._dropped.add(field)

    async def _read_stream(
        self, url: str, payload: dict[str, Any], on_delta: DeltaHandler, state: _StreamState
    ) -> None:
        try:
            async with self._client.stream("POST", url, json=payload) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    try:
                        body: Any = json.loads(raw)
                    except ValueError:
                        body = None
                    raise status_error(url, response.status_code, raw, body)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise BackendError(f"{url}: malformed JSON in stream: {data[:120]!r}", retriable=True) from None
                    if isinstance(chunk, dict) and "error" in chunk:
                        err = chunk["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        status = code if isinstance(code, int) else None
                        raise BackendError(
                            f"{url} failed mid-stream: {error_message(chunk)}",
                            status=status,
                            retriable=status is None or status in _RETRY_STATUSES,
                            body=chunk,
                        )
                    await state.take(chunk, on_delta)
        except httpx.TimeoutException as err:
            raise BackendError(f"{url}: timed out ({type(err).__name__})", retriable=True, timeout=True) from None
        except httpx.TransportError as err:
            raise BackendError(f"{url}: connection failed ({type(err).__name__}: {err})", retriable=True) from None

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
        """The server's /tokenize when it has one, else a local tokenizer file, else tiktoken."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = await self._find_tokenizer()
        return self._tokenizer

    async def _find_tokenizer(self) -> Tokenizer:
        root = root_url(self.base_url)
        for tokenize, detokenize in (
            (f"{root}/tokenize", f"{root}/detokenize"),
            (f"{self.base_url}/tokenize", f"{self.base_url}/detokenize"),
            (f"{root}/extras/tokenize", f"{root}/extras/detokenize"),
        ):
            candidate = RemoteTokenizer(self, tokenize, detokenize)
            try:
                ids = await candidate.encode("Hello world")
                if ids and await candidate.decode(ids):
                    return candidate
            except (BackendError, KeyError, TypeError, ValueError):
                continue
        if self._tokenizer_path:
            return local_tokenizer(self._tokenizer_path)
        return tiktoken_tokenizer()
