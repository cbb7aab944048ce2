"""Real-world HTTP through the upstream layer, on every path: ``solve`` (the RSA path of the Python
API), and ``serve`` (RSA and pass-through), each against small misbehaving servers on loopback."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from markov_rsa import BackendError, ErrorKind, GenerationRequest, MarkovRSA, OpenAIBackend, RSAParams, RunError
from test_proxy import RunningProxy
from upstream_servers import (
    RawUpstream,
    Request,
    chunked_with_trailers,
    closing_idle,
    dripping,
    garbage,
    gzipping,
    http10_close,
    huge,
    redirecting,
    response,
    throttling,
    well_behaved,
)

PARAMS = RSAParams(n=2, k=2, t=1, selection="majority", max_tokens=50, seed=1)
MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]


def solve(base_url: str, **backend: Any) -> Any:
    """The RSA path of the Python API, to the end."""

    async def run() -> Any:
        async with OpenAIBackend(base_url, "m", **backend) as http:
            return await MarkovRSA(http, PARAMS).solve(MESSAGES)

    return asyncio.run(run())


def chat(proxy: RunningProxy, *, rsa: bool, stream: bool = False, timeout: float = 60) -> httpx.Response:
    body = {"model": "m", "messages": MESSAGES, "rsa": rsa, "stream": stream}
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=timeout, trust_env=False)


def streamed_text(reply: httpx.Response) -> str:
    """The content of a streamed chat completion; error frames raise."""
    text = ""
    for line in reply.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def assert_every_path_works(server: RawUpstream, serve: Callable[..., RunningProxy]) -> None:
    """solve, RSA through the proxy, and pass-through (unary and streamed) all succeed against ``server``."""
    result = solve(server.base_url)
    assert result.answer == "42" and result.failed == 0
    proxy = serve(server.base_url)
    rsa = chat(proxy, rsa=True)
    assert rsa.status_code == 200, rsa.text
    assert "\\boxed{42}" in rsa.json()["choices"][0]["message"]["content"]
    passthrough = chat(proxy, rsa=False)
    assert passthrough.status_code == 200, passthrough.text
    # The body is relayed decoded, so no Content-Encoding is claimed for it.
    assert "content-encoding" not in passthrough.headers
    assert passthrough.json()["choices"][0]["message"]["content"].endswith("\\boxed{42}.")
    streamed = chat(proxy, rsa=False, stream=True)
    assert streamed.status_code == 200 and "content-encoding" not in streamed.headers
    assert streamed_text(streamed).endswith("\\boxed{42}.")


@pytest.mark.parametrize("handler", [gzipping, chunked_with_trailers, http10_close],
                         ids=["always-gzip", "chunked-with-trailers", "http10-close"])
def test_servers_that_frame_bodies_differently(raw_upstream: Any, serve_proxy: Any, handler: Any) -> None:
    server = raw_upstream(handler)
    assert_every_path_works(server, serve_proxy)
    # Every request names the client.
    assert all(r.headers.get("user-agent", "").startswith("markov-rsa/") for r in server.requests)


def test_a_server_that_closes_idle_keep_alive_connections(raw_upstream: Any, serve_proxy: Any) -> None:
    server = raw_upstream(closing_idle(0.05))

    def after_idle_close(call: Callable[[], Any]) -> Any:
        closed = server.closed_connections
        result = call()
        deadline = time.monotonic() + 10
        while server.closed_connections <= closed:  # the server dropped the kept-alive connection
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return result

    backend = OpenAIBackend(server.base_url, "m", max_retries=0)

    async def two_runs() -> list[Any]:
        results = [await MarkovRSA(backend, PARAMS).solve(MESSAGES)]
        await asyncio.to_thread(after_idle_close, lambda: None)
        results.append(await MarkovRSA(backend, PARAMS).solve(MESSAGES))
        await backend.aclose()
        return results

    assert [r.answer for r in asyncio.run(two_runs())] == ["42", "42"]
    proxy = serve_proxy(server.base_url, upstream_max_retries=0)
    for rsa in (True, False, True, False):
        reply = after_idle_close(lambda: chat(proxy, rsa=rsa))
        assert reply.status_code == 200, reply.text


# -- redirects ---------------------------------------------------------------------------------------


def test_307_within_the_origin_is_followed(raw_upstream: Any, serve_proxy: Any) -> None:
    server = raw_upstream(redirecting(307, lambda request, s: request.target.replace("/v1/", "/v2/")))
    assert_every_path_works(server, serve_proxy)
    moved = [r for r in server.requests if r.target.startswith("/v2/chat/completions")]
    # The redirected request is the same request: method and body kept.
    assert moved and all(r.method == "POST" and r.json["messages"] == MESSAGES for r in moved)


def test_cross_origin_and_301_redirects_are_clear_errors(raw_upstream: Any, serve_proxy: Any) -> None:
    other = raw_upstream(well_behaved)
    server = raw_upstream(redirecting(301, lambda request, s: other.origin + request.target))
    with pytest.raises(RunError) as caught:
        solve(server.base_url, max_retries=3, backoff_base=0.01)
    message = str(caught.value)
    assert "301" in message and other.origin in message and "redirect" in message
    # Not retried: one call per rollout.
    assert len([r for r in server.requests if r.target.endswith("/chat/completions")]) == PARAMS.n
    assert not other.requests
    # 307 to another origin is refused as well.
    cross = raw_upstream(redirecting(307, lambda request, s: other.origin + request.target))
    with pytest.raises(RunError, match="307"):
        solve(cross.base_url, max_retries=0)
    proxy = serve_proxy(server.base_url)
    for rsa in (True, False):
        reply = chat(proxy, rsa=rsa)
        assert reply.status_code == 502
        error = reply.json()["error"]
        assert "301" in error["message"] and "upstream 1" in error["message"]
        # Where the upstream points is not the client's business.
        assert str(other.port) not in reply.text and str(server.port) not in reply.text


async def test_a_stream_without_a_completion_is_a_failure(raw_upstream: Any) -> None:
    async def cut_short(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        frame = b'data: {"choices": [{"index": 0, "delta": {"content": "The answer"}}]}\n\n'
        writer.write(response(200, frame, content_type="text/event-stream"))
        await writer.drain()
        return True

    empty = raw_upstream(redirecting(301, lambda request, s: "http://elsewhere.invalid/"))
    short = raw_upstream(cut_short)
    request = GenerationRequest(messages=MESSAGES, max_tokens=10)
    for server, kind in ((empty, ErrorKind.status), (short, ErrorKind.protocol)):
        async with OpenAIBackend(server.base_url, "m", max_retries=0) as backend:
            with pytest.raises(BackendError) as caught:
                await backend.stream_complete(request, lambda text, reasoning: None)
        assert caught.value.kind is kind


# -- deadlines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_first", [True, False], ids=["dripping-body", "dripping-head"])
def test_a_dripping_server_fails_within_the_deadline(raw_upstream: Any, serve_proxy: Any, head_first: bool) -> None:
    server = raw_upstream(dripping(0.2, head_first=head_first))
    deadline = 1.5
    started = time.monotonic()
    with pytest.raises(RunError) as caught:
        solve(server.base_url, timeout=deadline, max_retries=0)
    assert "deadline" in str(caught.value) or "idle" in str(caught.value)
    assert all(f.kind is ErrorKind.timeout for f in caught.value.failures)
    # Bytes keep coming, yet the call ends: the deadline is total, not between bytes.
    assert time.monotonic() - started < 20 * deadline
    proxy = serve_proxy(server.base_url, upstream_timeout=deadline, upstream_max_retries=0)
    for rsa in (True, False):
        reply = chat(proxy, rsa=rsa)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["type"] == "upstream_timeout"
    streamed = chat(proxy, rsa=False, stream=True)
    if head_first:
        # The 200 was already sent; the stream ends with an error frame, not a body of spaces.
        assert streamed.status_code == 200 and '"upstream_timeout"' in streamed.text
    else:
        assert streamed.status_code == 504


def test_the_idle_timeout_bounds_silence_inside_a_body(raw_upstream: Any) -> None:
    server = raw_upstream(dripping(2.0, head_first=True))
    with pytest.raises(RunError) as caught:
        solve(server.base_url, timeout=600, idle_timeout=0.5, max_retries=0)
    assert "idle timeout" in str(caught.value)


# -- size ----------------------------------------------------------------------------------------------


def test_a_50_mb_completion(raw_upstream: Any, serve_proxy: Any) -> None:
    server = raw_upstream(huge(50 * 1024 * 1024))
    # Over the default cap: a clear error naming the limit, on every path.
    with pytest.raises(RunError) as caught:
        solve(server.base_url, max_retries=0)
    assert "exceeds the limit of 33554432 bytes" in str(caught.value)
    proxy = serve_proxy(server.base_url, upstream_max_retries=0)
    for rsa in (True, False):
        reply = chat(proxy, rsa=rsa)
        assert reply.status_code == 502 and "exceeds the limit of 33554432 bytes" in reply.json()["error"]["message"]
    # Under a larger cap it is handled, off the event loop: /health keeps answering meanwhile.
    roomy = serve_proxy(server.base_url, max_response_bytes=64 * 1024 * 1024,
                  defaults=PARAMS.model_copy(update={"t": 2, "tail_tokens": 64}))
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(reply=chat(roomy, rsa=True, timeout=600)))
    worker.start()
    health: list[float] = []
    with httpx.Client(timeout=30) as client:
        while worker.is_alive():
            started = time.perf_counter()
            assert client.get(roomy.url + "/health").status_code == 200
            health.append(time.perf_counter() - started)
    worker.join()
    assert box["reply"].status_code == 200, box["reply"].text
    assert box["reply"].json()["choices"][0]["message"]["content"].endswith("\\boxed{42}")
    # The run took seconds of work (parsing, tails, extraction); /health answered all along (its
    # latency under load is measured by bench/proxy.py, not asserted here).
    assert len(health) >= 3 and statistics.median(health) < 1.0, health


# -- retries -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"retry-after-ms": "600"}, {"Retry-After": "1"}], ids=["retry-after-ms", "retry-after"])
def test_retry_after_is_honoured(raw_upstream: Any, serve_proxy: Any, headers: dict[str, str]) -> None:
    server = raw_upstream(throttling(PARAMS.n, headers))
    result = solve(server.base_url, max_retries=2, backoff_base=0.001, backoff_max=0.002)
    assert result.answer == "42" and result.retries == PARAMS.n
    asked = 0.6 if "retry-after-ms" in headers else 1.0
    # Exponential backoff alone would have waited about a millisecond.
    first, retried = server.stamps[0], server.stamps[PARAMS.n]
    assert retried - first >= asked - 0.05


# -- pass-through --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ctype", "body"), [("text/html", b"<html>502 Bad Gateway</html>"),
                                             ("application/json", b"not json")], ids=["html", "not-json"])
def test_garbage_2xx_is_a_502(raw_upstream: Any, serve_proxy: Any, ctype: str, body: bytes) -> None:
    server = raw_upstream(garbage(ctype, body))
    proxy = serve_proxy(server.base_url, upstream_max_retries=0)
    for rsa, stream in ((False, False), (False, True), (True, False)):
        reply = chat(proxy, rsa=rsa, stream=stream)
        assert reply.status_code == 502, (rsa, stream, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "upstream_error" and "upstream 1" in error["message"]
        assert str(server.port) not in reply.text
    with pytest.raises(RunError):
        solve(server.base_url, max_retries=0)
