"""Tokenizer discovery: each server's tokenize/detokenize in its documented shape, found and used to
cut tails exactly; without one, tiktoken as a stated approximation that stays within tau."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from markov_rsa import TRUNCATION_MARKER, MarkovRSA, OpenAIBackend, RSAParams, tiktoken_tokenizer
from upstream_servers import ANSWER, RawUpstream, Request, response, well_behaved

LONG = "First I add seventeen and twenty-five, which gives forty-two; checking again: 17 + 25 = 42. " * 4 + ANSWER
PARAMS = RSAParams(n=2, k=2, t=2, tail_tokens=24, selection="majority", max_tokens=50, seed=1)


def ids(text: str) -> list[int]:
    """The stand-in servers' tokenizer: one token per UTF-8 byte."""
    return list(text.encode())


def text_of(tokens: list[int]) -> str:
    return bytes(tokens).decode(errors="replace")


# Each server's routes and fields, as its documentation gives them; anything else is refused the
# way that server refuses it.
def vllm(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path == "/tokenize" and "prompt" in body and body.get("add_special_tokens") is False:
        return 200, {"count": len(ids(body["prompt"])), "max_model_len": 4096, "tokens": ids(body["prompt"]),
                     "token_strs": None}
    if path == "/detokenize" and "tokens" in body and "model" in body:
        return 200, {"prompt": text_of(body["tokens"])}
    return (400, {"error": {"message": "field required", "code": 400}}) if path.endswith("tokenize") else (404, {})


def sglang(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path == "/v1/tokenize" and "prompt" in body:
        return 200, {"tokens": ids(body["prompt"]), "count": len(body["prompt"].encode()), "max_model_len": 4096}
    if path == "/v1/detokenize" and "tokens" in body:
        return 200, {"text": text_of(body["tokens"])}
    return 404, {"detail": "Not Found"}


def llama_server(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path == "/tokenize":
        # llama-server tokenizes "content"; a request without it gets an empty list, not an error.
        return 200, {"tokens": ids(body["content"]) if "content" in body else []}
    if path == "/detokenize":
        return 200, {"content": text_of(body.get("tokens", []))}
    return 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}


def llama_cpp_python(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path == "/extras/tokenize":
        if "input" not in body:
            return 500, {"error": "KeyError: 'input'"}
        return 200, {"tokens": ids(body["input"])}
    if path == "/extras/detokenize":
        return 200, {"text": text_of(body["tokens"])}
    return 404, {"detail": "Not Found"}


def serving(routes: Any) -> Any:
    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        path = request.target.split("?")[0]
        if "tokenize" in path:
            status, body = routes(path, request.json or {})
            writer.write(response(status, json.dumps(body).encode()))
            await writer.drain()
            return True
        if path.endswith("/chat/completions") and not (request.json or {}).get("stream"):
            body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": LONG}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            writer.write(response(200, json.dumps(body).encode()))
            await writer.drain()
            return True
        return await well_behaved(request, writer, server)

    return handler


async def solve(server: RawUpstream) -> Any:
    async with OpenAIBackend(server.base_url, "m", return_token_ids=False) as backend:
        return await MarkovRSA(backend, PARAMS).solve("What is 17 + 25?")


def shown_tails(result: Any) -> list[str]:
    tails = [tail for record in result.population for tail in record.shown_tails or []]
    assert tails and all(tail.startswith(TRUNCATION_MARKER) for tail in tails)
    return [tail.removeprefix(TRUNCATION_MARKER + "\n") for tail in tails]


@pytest.mark.parametrize(
    ("routes", "shape", "field"),
    [(vllm, "vllm", "prompt"), (sglang, "sglang", "prompt"), (llama_server, "llama-server", "content"),
     (llama_cpp_python, "llama-cpp-python", "input")],
    ids=["vllm", "sglang", "llama-server", "llama-cpp-python"],
)
async def test_each_servers_tokenizer_is_found_in_its_shape(raw_upstream: Any, routes: Any, shape: str,
                                                             field: str) -> None:
    server = raw_upstream(serving(routes))
    result = await solve(server)
    assert result.tokenizer == "remote" and result.answer == "42"
    # Cut in the server's own tokens (bytes here): exactly within tau.
    assert all(len(tail.encode()) <= PARAMS.tail_tokens for tail in shown_tails(result))
    tokenized = [r for r in server.requests if r.target.endswith("tokenize") and r.json and field in r.json]
    assert tokenized and all(r.json[field] for r in tokenized)


async def test_without_a_tokenizer_tails_are_approximate_within_tau(raw_upstream: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    server = raw_upstream(serving(lambda path, body: (404, {"detail": "Not Found"})))
    with caplog.at_level(logging.WARNING, logger="markov_rsa"):
        result = await solve(server)
    assert result.tokenizer.startswith("tiktoken:") and "approximate" in result.tokenizer
    # Said once, whatever the number of tails cut.
    assert sum("approximate" in r.getMessage() for r in caplog.records) == 1
    encoding = tiktoken_tokenizer()
    # A margin under tau in tiktoken's tokens, so the model's own count stays within tau.
    for tail in shown_tails(result):
        assert len(await encoding.encode(tail)) <= int(PARAMS.tail_tokens * 0.75)


@pytest.mark.parametrize("token_ids", [["12", "13"] * 40, [1.5] * 80, [None] * 80])
def test_token_ids_that_are_not_integers_are_not_decoded(token_ids: list[Any]) -> None:
    """A server's token list is used as sent, so a list of anything but integers must not reach the
    detokenizer: the tail is cut from the text, re-tokenized, instead."""
    from markov_rsa._tails import make_tail
    from markov_rsa._tokenizers import SyncTokenizer
    from markov_rsa._types import Trace

    decoded: list[list[Any]] = []

    def decode(tokens: list[Any]) -> str:
        decoded.append(tokens)
        assert all(isinstance(t, int) for t in tokens), tokens
        return text_of(tokens)

    tokenizer = SyncTokenizer("bytes", ids, decode, exact=True, decodes_backend_ids=True)
    tail = asyncio.run(make_tail(Trace(content=LONG, token_ids=token_ids), 24, tokenizer))
    assert tail.truncated and decoded == [ids(LONG)[-24:]]
    assert tail.text.endswith(ANSWER[-10:])
