"""Calls fitted to the model's context: max_tokens lowered, tails shortened evenly, both reported."""

from __future__ import annotations

from typing import Any

from markov_rsa import TRUNCATION_MARKER, MarkovRSA, OpenAIBackend, RolloutFinished, RSAParams
from markov_rsa.fake_backend._generation import chat_prompt_ids
from markov_rsa.fake_backend._solver import encoding

PROBLEM = "What is 17 + 25 * 3?"


async def run(server: Any, params: RSAParams) -> tuple[Any, dict[tuple[int, int], Any]]:
    records: dict[tuple[int, int], Any] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, RolloutFinished):
            records[(event.record.round, event.record.slot)] = event.record

    async with OpenAIBackend(server.base_url, max_retries=0) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
    return result, records


def total_tokens(body: dict[str, Any]) -> int:
    return len(chat_prompt_ids(body["messages"])) + body["max_tokens"]


async def test_max_tokens_is_lowered_to_the_room_the_prompt_leaves(fake_backend: Any) -> None:
    # The server reports and enforces a 1200-token context: the aggregation prompts plus the
    # 1100-token budget would not fit, and the server would answer 400.
    server = fake_backend(length_mean=300, max_model_len=1200)
    params = RSAParams(n=4, k=2, t=2, tail_tokens=200, max_tokens=1100, seed=2, selection="majority")
    result, records = await run(server, params)
    assert result.failed == 0 and result.answer is not None
    log = server.stats.requests_log
    assert all(total_tokens(body) <= 1200 for body in log)
    lowered = [body for body in log if body["max_tokens"] < 1100]
    assert len(lowered) == 4  # the four aggregations; round 0's short prompt fits as it is
    for slot in range(4):
        assert records[(0, slot)].fitted is None
        assert "max_tokens lowered from 1100 to" in records[(1, slot)].fitted
    assert any("4 call(s) had max_tokens lowered to fit the 1200-token context" in n for n in result.notes)


async def test_tails_are_shortened_evenly_when_the_prompt_alone_does_not_fit(fake_backend: Any) -> None:
    server = fake_backend(length_mean=700, max_model_len=800)
    params = RSAParams(n=3, k=2, t=2, tail_tokens=500, max_tokens=700, seed=2, selection="majority")
    result, records = await run(server, params)
    assert result.failed == 0
    log = server.stats.requests_log
    assert all(total_tokens(body) <= 800 for body in log)
    enc = encoding()
    for slot in range(3):
        record = records[(1, slot)]
        assert "tails shortened to" in record.fitted and "max_tokens lowered" in record.fitted
        each = int(record.fitted.split("tails shortened to ")[1].split()[0])
        lengths = [len(enc.encode_ordinary(t.removeprefix(TRUNCATION_MARKER + "\n"))) for t in record.shown_tails]
        assert all(t.startswith(TRUNCATION_MARKER) for t in record.shown_tails)
        # Evenly: every tail got the same budget, well under the 500 tokens carried forward.
        assert all(length <= each for length in lengths) and each < 300
        # (a cut moves forward to a line break by at most a quarter of the tail)
        assert min(lengths) >= 0.7 * each
    assert any("tails were shortened evenly" in n for n in result.notes)


async def test_a_context_length_given_as_a_parameter_wins(fake_backend: Any) -> None:
    server = fake_backend(length_mean=100)  # reports 131072
    params = RSAParams(n=2, k=2, t=2, tail_tokens=60, max_tokens=900, seed=1, selection="majority",
                       max_model_len=600)
    result, _ = await run(server, params)
    assert all(total_tokens(body) <= 600 for body in server.stats.requests_log)
    assert any(body["max_tokens"] < 900 for body in server.stats.requests_log)
