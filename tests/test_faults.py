"""Retries, drops and clear failures against an unreliable simulated backend."""

from __future__ import annotations

from typing import Any

import pytest

from markov_rsa import MarkovRSA, OpenAIBackend, RSAParams, RunError

PROBLEM = "What is 12 * 12?"
FAST_RETRY = {"backoff_base": 0.01, "backoff_max": 0.05}


async def test_run_survives_twenty_percent_faults(fake_backend: Any) -> None:
    server = fake_backend(
        length_mean=30, fault_rate_5xx=0.06, fault_rate_drop=0.05, fault_rate_hang=0.05, fault_rate_429=0.04, seed=9
    )
    params = RSAParams(n=12, k=3, t=2, tail_tokens=20, max_tokens=200, seed=4)
    async with OpenAIBackend(server.base_url, timeout=0.5, max_retries=6, **FAST_RETRY) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM)
    faults = server.stats.faults
    assert sum(faults.values()) > 0
    assert result.retries == sum(faults.values())
    assert result.calls == params.n * params.t
    assert result.answer is not None
    assert result.usage.to_dict() == server.stats.usage


async def test_dropped_rollouts_are_reported_and_the_run_goes_on(fake_backend: Any) -> None:
    server = fake_backend(length_mean=30, fault_rate_5xx=0.25, seed=2)
    params = RSAParams(n=16, k=2, t=2, tail_tokens=20, max_tokens=200, seed=8, min_survivors=0.25)
    async with OpenAIBackend(server.base_url, max_retries=0, **FAST_RETRY) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM)
    assert result.failed == server.stats.faults["5xx"] > 0
    assert sum(r.failed for r in result.rounds) == result.failed
    survivors_round0 = {r.slot for r in result.population if r.ok}
    assert survivors_round0  # the run produced a final population
    # Aggregations only ever drew from rollouts that succeeded.
    assert result.calls == params.n * params.t


async def test_client_error_is_not_retried_and_is_clear(fake_backend: Any) -> None:
    server = fake_backend(length_mean=30, reject_fields=["stop"])
    params = RSAParams(n=4, k=2, t=2, tail_tokens=20, max_tokens=200, seed=1)
    async with OpenAIBackend(server.base_url, max_retries=5, **FAST_RETRY) as backend:
        rsa = MarkovRSA(backend, params, request_extra={"stop": ["\n\n\n"]})
        with pytest.raises(RunError) as caught:
            await rsa.solve(PROBLEM)
    assert len(server.stats.requests_log) == params.n  # one attempt each, no retries
    message = str(caught.value)
    assert "400" in message and "stop" in message and "round 0" in message
    assert "\n" not in message


async def test_every_rollout_failing_is_a_clear_error(fake_backend: Any) -> None:
    server = fake_backend(fault_rate_5xx=1.0)
    params = RSAParams(n=3, k=2, t=2, tail_tokens=20, max_tokens=100, seed=1)
    async with OpenAIBackend(server.base_url, max_retries=2, **FAST_RETRY) as backend:
        with pytest.raises(RunError) as caught:
            await MarkovRSA(backend, params).solve(PROBLEM)
    assert "3 of 3 rollouts failed" in str(caught.value)
    assert "500" in str(caught.value) or "503" in str(caught.value)
    assert len(server.stats.requests_log) == 3 * 3  # 1 try + 2 retries each
    assert len(caught.value.failures) == 3


async def test_a_broken_response_fails_the_rollout_instead_of_hanging() -> None:
    import asyncio

    body = b'{"choices": [{"message": "not an object"}], "usage": {}}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        params = RSAParams(n=2, k=2, t=1, max_tokens=10, seed=1)
        async with OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0) as backend:
            with pytest.raises(RunError) as caught:
                await asyncio.wait_for(MarkovRSA(backend, params).solve(PROBLEM), 10)
    assert "unexpected chat completion response" in str(caught.value)
