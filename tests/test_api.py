"""The Python API: sync solve, the event iterator, run logs from the API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import markov_rsa
from markov_rsa import MarkovRSA, OpenAIBackend, RSAParams, RunFinished

SMALL = {"n": 3, "k": 2, "t": 2, "tail_tokens": 20, "max_tokens": 300, "seed": 1}


def test_sync_solve_with_run_dir(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0)
    events: list[str] = []
    result = markov_rsa.solve(
        "What is 6 * 7?", backend=server.base_url, run_dir=str(tmp_path), on_event=lambda e: events.append(e.type),
        **SMALL,
    )
    assert result.answer == "42" and result.calls == 6
    assert events[0] == "run_started" and events[-1] == "run_finished"
    kinds = [json.loads(line)["type"] for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert kinds.count("rollout") == 6 and kinds[0] == "config" and kinds[-1] == "result"


async def test_sync_solve_inside_a_running_loop(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0)
    # A notebook calls the sync API with its own loop running: the run moves to a worker thread.
    result = markov_rsa.solve("What is 40 + 2?", backend=server.base_url, **SMALL)
    assert result.answer == "42"


async def test_event_iterator(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40)
    async with OpenAIBackend(server.base_url) as backend:
        seen = [event async for event in MarkovRSA(backend, RSAParams(**SMALL)).stream("What is 2 + 2?")]
    types = [e.type for e in seen]
    assert types.count("rollout_finished") == 6 and types.count("round_finished") == 2
    assert isinstance(seen[-1], RunFinished) and seen[-1].result.calls == 6
    dones = [e.progress.done for e in seen if e.type == "rollout_finished"]
    assert dones == [1, 2, 3, 1, 2, 3]


async def test_closing_the_iterator_cancels_the_run(fake_backend: Any) -> None:
    server = fake_backend(length_mean=200, tokens_per_second=100)
    async with OpenAIBackend(server.base_url) as backend:
        stream = MarkovRSA(backend, RSAParams(**SMALL)).stream("What is 2 + 2?")
        async for event in stream:
            if event.type == "round_started":
                break
        await wait_for(lambda: server.stats.in_flight == 3)
        await stream.aclose()
        # The in-flight rollouts were abandoned, and the server saw every client leave.
        await wait_for(lambda: server.stats.cancelled == 3)
    assert server.stats.served == 0 and server.stats.requests == 3


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_one_backend_object_serves_two_sync_solves(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0)
    backend = OpenAIBackend(server.base_url)
    # Each sync call runs its own event loop; pooled connections of the first must not be reused.
    for _ in range(2):
        assert markov_rsa.solve("What is 6 * 7?", backend=backend, **SMALL).answer == "42"
