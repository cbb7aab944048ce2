"""The servers' own tokenizers: each server's ``/tokenize`` and ``/detokenize`` in its documented shape.

| server | tokenize | detokenize |
|---|---|---|
| vLLM, SGLang | ``POST /tokenize`` ``{"model", "prompt", "add_special_tokens"}`` -> ``{"tokens"}`` | ``{"model", "tokens"}`` -> ``{"prompt"}`` (SGLang ``{"text"}``) |
| SGLang (under the base URL) | ``POST /v1/tokenize``, same shape | ``POST /v1/detokenize`` |
| llama.cpp ``llama-server`` | ``POST /tokenize`` ``{"content", "add_special"}`` -> ``{"tokens"}`` | ``{"tokens"}`` -> ``{"content"}`` |
| llama-cpp-python | ``POST /extras/tokenize`` ``{"input"}`` -> ``{"tokens"}`` | ``POST /extras/detokenize`` ``{"tokens"}`` -> ``{"text"}`` |

Paths are under the upstream's root (its base URL without ``/v1``; a path prefix is kept).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._errors import BackendError, ErrorKind
from ._client import UpstreamClient

ModelName = Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class TokenizerShape:
    """Where one kind of server tokenizes, and the fields it wants."""

    server: str
    tokenize: str
    detokenize: str
    text_field: str
    """The field of the tokenize request that carries the text."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Fixed fields of the tokenize request (no special tokens added)."""
    sends_model: bool = True
    root: bool = True
    """Paths under the root (``/tokenize``) rather than under the base URL (``/v1/tokenize``)."""


SHAPES = (
    TokenizerShape("vllm", "/tokenize", "/detokenize", "prompt", (("add_special_tokens", False),)),
    TokenizerShape("llama-server", "/tokenize", "/detokenize", "content", (("add_special", False),), sends_model=False),
    TokenizerShape("sglang", "/tokenize", "/detokenize", "prompt", (("add_special_tokens", False),), root=False),
    TokenizerShape("llama-cpp-python", "/extras/tokenize", "/extras/detokenize", "input", sends_model=False),
)
_PROBE_TEXT = "Hello world"


class RemoteTokenizer:
    """The upstream's own tokenizer, in one server's request shape. ``name`` is ``remote`` (no address)."""

    exact = True
    decodes_backend_ids = True
    name = "remote"

    def __init__(self, client: UpstreamClient, shape: TokenizerShape, model: ModelName,
                 call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None) -> None:
        self.shape = shape
        self._client = client
        self._model = model
        self._call = call

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        async def once() -> Any:
            return await self._client.request_json("POST", path, payload, root=self.shape.root)

        data = await (self._call(once) if self._call is not None else once())
        if not isinstance(data, dict):
            raise BackendError(f"{path}: unexpected answer {str(data)[:120]}", kind=ErrorKind.protocol)
        return data

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` from the server (no special tokens)."""
        shape = self.shape
        payload: dict[str, Any] = {shape.text_field: text, **dict(shape.extra)}
        if shape.sends_model:
            payload["model"] = await self._model()
        data = await self._post(shape.tokenize, payload)
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise BackendError(f"{shape.tokenize}: no token list in the answer", kind=ErrorKind.protocol)
        # llama-server can answer with pieces ({"id", "piece"}) when asked; plain ids otherwise.
        return [int(t["id"] if isinstance(t, dict) else t) for t in tokens]

    async def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` from the server."""
        shape = self.shape
        payload: dict[str, Any] = {"tokens": ids}
        if shape.sends_model:
            payload["model"] = await self._model()
        data = await self._post(shape.detokenize, payload)
        for key in ("prompt", "text", "content"):
            if isinstance(data.get(key), str):
                return str(data[key])
        raise BackendError(f"{shape.detokenize}: no text in the answer", kind=ErrorKind.protocol)


async def discover_tokenizer(client: UpstreamClient, model: ModelName,
                             call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None,
                             ) -> RemoteTokenizer | None:
    """The first server shape whose tokenize and detokenize round-trip a probe text, or None.

    A failed probe means "not this shape", not "try again": probes are not retried. Later calls
    of the tokenizer found go through ``call`` (the backend's retry policy).
    """
    for shape in SHAPES:
        probe = RemoteTokenizer(client, shape, model)
        try:
            ids = await probe.encode(_PROBE_TEXT)
            # A server that ignores an unknown text field tokenizes nothing: not its shape.
            if ids and "Hello" in await probe.decode(ids):
                return RemoteTokenizer(client, shape, model, call)
        except (BackendError, KeyError, TypeError, ValueError):
            continue
    return None
