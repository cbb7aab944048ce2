"""Routing over several upstreams, admission of runs, and how the proxy reads a chat request."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from markov_rsa import BackendError, CallOutcome, ErrorKind, GenerationRequest, MarkovRSA, OpenAIBackend, RSAParams
from markov_rsa._errors import outcome_of
from markov_rsa._routing import UpstreamPool
from markov_rsa.upstream import UpstreamClient
from markov_rsa.server import ServerConfig
from markov_rsa.server._errors import APIError
from markov_rsa.server._limits import RunLimiter
from markov_rsa.server._requests import decide, parse_rsa_request


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- UpstreamPool --------------------------------------------------------------------------------------


async def test_least_outstanding_requests_wins() -> None:
    pool = UpstreamPool(["http://a/v1", "http://b/v1", "http://c/v1"])
    a, b, c = pool.upstreams
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    chosen = await pool.acquire()
    assert chosen is b and b.outstanding == 2
    # Ties are broken round-robin, not always towards the first upstream.
    picks = set()
    for _ in range(6):
        up = await pool.acquire()
        picks.add(up.base_url)
        pool.release(up)
    assert picks == {"http://b/v1", "http://c/v1"}


async def test_per_upstream_cap_makes_callers_wait() -> None:
    pool = UpstreamPool(["http://a/v1"], per_upstream_concurrency=2)
    first, second = await pool.acquire(), await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done() and pool.try_acquire() is None
    pool.release(first)
    assert (await asyncio.wait_for(waiting, 1)) is first
    assert first.outstanding == 2
    # A waiter that gives up does not swallow the slot.
    cancelled = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    pool.release(second)
    assert (await pool.acquire()) is second


async def test_failing_upstreams_leave_rotation_and_all_down_still_routes() -> None:
    pool = UpstreamPool(["http://a/v1", "http://b/v1"], failure_threshold=2)
    a, b = pool.upstreams
    lease = await pool.acquire()
    pool.release(lease, CallOutcome.connect_error, "refused")
    assert not lease.healthy
    other = a if lease is b else b
    for _ in range(3):
        assert (await pool.acquire()) is other
    for _ in range(3):
        pool.release(other)
    for _ in range(2):
        up = await pool.acquire()
        pool.release(up, CallOutcome.server_error, "503")
    assert not a.healthy and not b.healthy
    # With nobody healthy, requests still go out (each one is a probe).
    assert (await pool.acquire()) in (a, b)


async def test_probe_puts_an_upstream_back(fake_backend: Any) -> None:
    server = fake_backend()
    pool = UpstreamPool([server.base_url, closed_port_url()], probe_interval_s=0.05, health_interval_s=0.1)
    client = UpstreamClient(pool)
    live, dead = pool.upstreams
    pool.mark_down(live, "test")
    client.start()
    try:
        for _ in range(250):
            await asyncio.sleep(0.02)
            if live.healthy and not dead.healthy:
                break
        assert live.healthy and not dead.healthy
        # Names, not addresses, are what clients see.
        assert (live.name, dead.name) == ("upstream 1", "upstream 2")
        assert dead.to_dict(details=False) == {"name": "upstream 2", "healthy": False}
    finally:
        await client.aclose()


def test_outcomes_and_client_statuses_come_from_the_kind() -> None:
    cases = [
        (BackendError("x", status=400), CallOutcome.client_error, 400),
        (BackendError("x", status=503, retriable=True), CallOutcome.server_error, 502),
        (BackendError("x", kind=ErrorKind.timeout, retriable=True), CallOutcome.timeout, 504),
        (BackendError("x", kind=ErrorKind.connect, retriable=True), CallOutcome.connect_error, 502),
        (BackendError("x", kind=ErrorKind.protocol, retriable=True), CallOutcome.protocol_error, 502),
        (BackendError("x", kind=ErrorKind.too_large), CallOutcome.too_large, 502),
        (BackendError("x", kind=ErrorKind.status, status=301), CallOutcome.client_error, 502),
    ]
    for err, outcome, status in cases:
        assert (outcome_of(err), err.client_status) == (outcome, status)
    assert outcome_of(None) is CallOutcome.ok
    assert outcome_of(asyncio.CancelledError()) is CallOutcome.cancelled


def test_named_upstreams() -> None:
    pool = UpstreamPool(["gpu-a=http://127.0.0.1:9/v1", "http://127.0.0.1:1/v1/"])
    assert [(u.name, u.base_url, u.root) for u in pool.upstreams] == [
        ("gpu-a", "http://127.0.0.1:9/v1", "http://127.0.0.1:9"),
        ("upstream 2", "http://127.0.0.1:1/v1", "http://127.0.0.1:1"),
    ]
    # The same spelling works wherever backends are configured.
    from markov_rsa._settings import BackendSettings, make_backend

    backend = make_backend(BackendSettings.model_validate({"backend": ["gpu-a=http://127.0.0.1:9/v1"]}))
    assert [(u.name, u.base_url) for u in backend.client.pool.upstreams] == [("gpu-a", "http://127.0.0.1:9/v1")]


async def test_routed_backend_moves_past_a_dead_upstream(fake_backend: Any) -> None:
    server = fake_backend(length_mean=20)
    pool = UpstreamPool([closed_port_url(), server.base_url])
    backend = OpenAIBackend(pool, max_retries=3, backoff_base=0.01, backoff_max=0.02)
    try:
        result = await MarkovRSA(backend, RSAParams(n=4, k=2, t=2, tail_tokens=16, max_tokens=100, seed=3)).solve(
            "What is 6 * 7?"
        )
        texts: list[str] = []
        thoughts: list[str] = []
        trace = await backend.stream_complete(
            GenerationRequest(messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=300),
            lambda text, reasoning: (texts.append(text), thoughts.append(reasoning)),
        )
    finally:
        await backend.aclose()
    assert result.failed == 0 and result.usage.to_dict() == {
        k: server.stats.usage[k] - trace.usage.to_dict()[k] for k in server.stats.usage
    }
    assert not pool.upstreams[0].healthy
    assert "".join(texts) == trace.content and "".join(thoughts) == trace.reasoning
    assert len(texts) > 1
    assert trace.finish_reason == "stop" and trace.token_ids


# -- RunLimiter ----------------------------------------------------------------------------------------


async def test_run_limiter_queue_and_overflow() -> None:
    limiter = RunLimiter(max_running=1, max_queued=1)
    running = limiter.admit()
    queued = limiter.admit()
    assert running is not None and queued is not None and limiter.admit() is None
    assert running.running and not queued.running
    waiting = asyncio.create_task(queued.wait())
    await asyncio.sleep(0)
    running.release()
    await asyncio.wait_for(waiting, 1)
    assert limiter.running == 1 and limiter.queued == 0
    queued.release()
    assert limiter.running == 0
    # A queued run that leaves gives its place back.
    first, second = limiter.admit(), limiter.admit()
    assert first is not None and second is not None
    second.release()
    assert limiter.queued == 0
    first.release()
    assert limiter.running == 0


# -- reading requests ----------------------------------------------------------------------------------

CONFIG = ServerConfig(upstreams=["http://x/v1"], defaults=RSAParams(n=8, k=2, t=2))
MESSAGES = [{"role": "user", "content": "What is 1 + 1?"}]


@pytest.mark.parametrize(
    ("body", "rsa"),
    [
        ({}, True),
        ({"rsa": True}, True),
        ({"rsa": {"n": 4}}, True),
        ({"rsa": False}, False),
        ({"rsa": {"enabled": False}}, False),
        ({"n": 2}, False),
        ({"tools": [{"type": "function"}]}, False),
        ({"tools": [], "n": 1}, True),
    ],
)
def test_decide(body: dict[str, Any], rsa: bool) -> None:
    body = {"model": "m", "messages": MESSAGES, **body}
    route = decide(body, b"raw", CONFIG)
    assert route.rsa is rsa
    assert ("rsa" in body) == (route.raw != b"raw")


def test_model_prefix_is_stripped_for_the_upstream() -> None:
    config = CONFIG.model_copy(update={"rsa_by_default": False})
    assert decide({"model": "m", "messages": MESSAGES}, b"raw", config).rsa is False
    route = decide({"model": "mrsa/m", "messages": MESSAGES, "rsa": False}, b"raw", config)
    assert route.rsa is False and route.model == "m" and b"mrsa" not in route.raw and b"rsa" not in route.raw


def test_rsa_request_precedence_and_extras() -> None:
    body = {
        "model": "m",
        "messages": MESSAGES,
        "max_completion_tokens": 500,
        "max_tokens": 900,
        "temperature": 0.2,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": True},
        "rsa": {"n": 4, "temperature": 0.7, "progress": True, "request_timeout": 5},
    }
    request = parse_rsa_request(body, body["rsa"], CONFIG)
    p = request.params
    assert (p.n, p.k, p.t, p.max_tokens, p.temperature) == (4, 2, 2, 500, 0.2)
    assert request.progress and request.stream and request.include_usage
    assert request.request_extra == {"stop": ["END"]}
    assert request.chat_template_kwargs == {"enable_thinking": True}


@pytest.mark.parametrize(
    ("rsa", "extra", "param"),
    [
        ({"n": -1}, {}, "rsa.n"),
        ({"k": 9}, {}, "rsa"),
        ({"nope": 1}, {}, "rsa.nope"),
        ({}, {"top_p": 0}, "top_p"),
        ({}, {"messages": []}, "messages"),
        ({}, {"messages": "hi"}, "messages"),
        ({}, {"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ],
)
def test_rsa_request_errors_name_the_field(rsa: dict[str, Any], extra: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": MESSAGES, **extra}
    with pytest.raises(APIError) as caught:
        # Strict: k above n and unknown fields are errors rather than clamped and ignored.
        parse_rsa_request(body, rsa, CONFIG.model_copy(update={"strict_rsa": True}))
    assert caught.value.status == 400 and caught.value.param == param


# -- the pass-through HTTP client ---------------------------------------------------------------------


async def _serve_raw(handler: Any) -> tuple[asyncio.Server, str]:
    """A bare HTTP/1.1 server: ``handler(path, body, writer)`` answers each request."""
    connections = 0

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
                body = await reader.readexactly(length)
                if not await handler(lines[0].split()[1], body, writer, connections):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_upstream_client_reuses_connections_and_dechunks() -> None:
    async def handler(path: str, body: bytes, writer: asyncio.StreamWriter, connections: int) -> bool:
        if path == "/v1/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: one\n\n", b"data: two\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return True
        if path == "/v1/slow":
            await asyncio.sleep(5)
        reply = b"%d:%s" % (connections, body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
        # "/once" answers and then closes, as a server whose keep-alive timeout ran out.
        return path != "/v1/once"

    server, url = await _serve_raw(handler)
    client = UpstreamClient(UpstreamPool([url + "/v1"]))

    async def post(path: str, body: bytes, timeout: float | None = None) -> bytes:
        async with await client.open("POST", path, content=body, timeout=timeout) as response:
            return await response.read()

    try:
        replies = [await post("/echo", body) for body in (b"a", b"b", b"c")]
        assert replies == [b"1:a", b"1:b", b"1:c"]  # one keep-alive connection, reused
        async with await client.open("POST", "/chunked", content=b"") as chunked:
            assert b"".join([piece async for piece in chunked.iter_bytes()]) == b"data: one\n\ndata: two\n\n"
        assert (await post("/once", b"d")).endswith(b":d")
        # The closed connection is dropped (or retried on a fresh one), never a failure.
        assert (await post("/echo", b"e")).endswith(b":e")
        with pytest.raises(BackendError) as caught:
            await post("/slow", b"f", timeout=0.2)
        assert caught.value.kind is ErrorKind.timeout and "upstream 1" in str(caught.value)
        assert "127.0.0.1" not in str(caught.value)
        assert client.pool.upstreams[0].outstanding == 0
    finally:
        await client.aclose()
        server.close()
