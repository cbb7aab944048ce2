"""The OpenAI-compatible proxy, end to end: the official openai client against the proxy, the
simulated backend as its upstream, everything over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from markov_rsa import OpenAIBackend, RSAParams
from markov_rsa.fake_backend import FakeBackend
from markov_rsa.server import ServerConfig, create_app

SMALL = RSAParams(n=4, k=2, t=2, tail_tokens=32, max_tokens=300)
PROBLEM = [{"role": "user", "content": "What is 17 + 25 * 3?"}]
MODEL = "fake-reasoner"


class RunningProxy:
    """The proxy app served by uvicorn from a background thread."""

    def __init__(self, config: ServerConfig, backend_factory: Any = None) -> None:
        self.app = create_app(config, backend_factory)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.base_url = self.url + "/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.01)

    def client(self, api_key: str = "none", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.url + "/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def proxy() -> Iterator[Callable[..., RunningProxy]]:
    """Start proxies in front of the given upstreams; all are stopped after the test."""
    started: list[RunningProxy] = []

    def start(*upstreams: FakeBackend, backend_factory: Any = None, **fields: Any) -> RunningProxy:
        fields.setdefault("defaults", SMALL)
        fields.setdefault("probe_interval_s", 0.2)
        config = ServerConfig(upstreams=[u.base_url for u in upstreams], **fields)
        running = RunningProxy(config, backend_factory)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        value for (key, have), value in samples.items() if key == name and all(dict(have).get(k) == v for k, v in labels.items())
    )


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# -- RSA ---------------------------------------------------------------------------------------------


def test_rsa_completion_sums_usage_and_reports_the_run(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=40)
    client = proxy(upstream).client()
    response = client.chat.completions.create(model=MODEL, messages=PROBLEM)
    assert response.object == "chat.completion"
    assert "\\boxed{" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.model_extra.get("reasoning")
    # Every upstream call, prompt and completion alike, is in the usage.
    assert response.usage.model_dump(exclude_none=True) == upstream.stats.usage
    rsa = response.model_extra["rsa"]
    assert rsa["population"] == 4 and rsa["rounds"] == 2 and rsa["aggregation_size"] == 2
    assert rsa["requests"] == upstream.stats.requests == 8
    assert rsa["selection"] in ("majority", "final_agg")
    assert sum(count for _, count in rsa["votes"]) >= 2
    assert rsa["vote"]["winner"] == rsa["answer"] == rsa["votes"][0][0]
    assert [r["round"] for r in rsa["per_round"]] == [0, 1]
    per_round = [r["usage"] for r in rsa["per_round"]]
    assert sum(u["total_tokens"] for u in per_round) == response.usage.total_tokens


def test_rsa_stream_matches_the_unary_answer(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=40)
    client = proxy(upstream).client()
    body = {"rsa": {"seed": 7}}
    unary = client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body=body)
    usage_before = dict(upstream.stats.usage)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=PROBLEM, stream=True, stream_options={"include_usage": True}, extra_body=body
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == unary.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["rsa"]["population"] == 4
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    streamed_calls = {k: upstream.stats.usage[k] - usage_before[k] for k in usage_before}
    assert usage.model_dump(exclude_none=True) == streamed_calls


def test_stream_sends_heartbeats_and_done(fake_backend: Any, proxy: Any) -> None:
    # Rollouts finish one after another every ~0.02 s: events the client does not see (no
    # progress asked for) must not hold the heartbeats back.
    upstream = fake_backend(length_mean=40, length_sigma=0.5, tokens_per_second=200)
    running = proxy(upstream, heartbeat_s=0.05, defaults=SMALL.model_copy(update={"n": 8}))
    body = {"model": MODEL, "messages": PROBLEM, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(response)
    elapsed = time.monotonic() - started
    assert lines.count(": keepalive") >= elapsed / 0.05 / 3
    assert lines[-1] == "data: [DONE]"
    assert not any("event" in (json.loads(line[6:]).get("rsa") or {}) for line in lines if line.startswith("data: {"))


def test_stream_progress_chunks(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=30)
    running = proxy(upstream)
    body = {"model": MODEL, "messages": PROBLEM, "stream": True, "rsa": {"progress": True}}
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as response:
        lines = sse_lines(response)
    frames = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    progress = [f["rsa"] for f in frames if f.get("rsa") and "event" in f["rsa"]]
    events = [p["event"] for p in progress]
    assert events.count("round_started") == 2 and events.count("round_finished") == 2
    assert events.count("rollout_finished") == 8
    last = [p for p in progress if p["event"] == "round_finished"][-1]
    assert last["round"] == 1 and last["done"] == 4 and last["tokens"] > 0 and last["population"] == 4
    # Progress chunks carry an empty delta, so clients that only read content are not disturbed.
    assert all(f["choices"][0]["delta"] == {} for f in frames if f.get("rsa") and "event" in f["rsa"])


def test_final_aggregation_tokens_are_relayed_live(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=60, tokens_per_second=400)
    running = proxy(upstream)
    body = {
        "model": MODEL,
        "messages": PROBLEM,
        "stream": True,
        "stream_options": {"include_usage": True},
        "rsa": {"selection": "final_agg", "progress": True},
    }
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as response:
        frames = [json.loads(line[6:]) for line in sse_lines(response) if line.startswith("data: {")]
    started = next(i for i, f in enumerate(frames) if (f.get("rsa") or {}).get("event") == "final_aggregation")
    deltas = [f["choices"][0]["delta"] for f in frames[started + 1 :] if f["choices"] and f["choices"][0]["delta"]]
    # The final call streamed in several pieces, reasoning first, then the answer.
    assert len(deltas) >= 3
    assert deltas[0].get("reasoning")
    answer = "".join(d.get("content") or "" for d in deltas)
    assert "\\boxed{" in answer
    assert frames[-1]["usage"] == upstream.stats.usage
    assert upstream.stats.requests == 4 * 2 + 1


def test_failed_run_streams_an_error_frame_then_done(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(fault_rate_5xx=1.0)
    running = proxy(upstream, upstream_max_retries=0)
    body = {"model": MODEL, "messages": PROBLEM, "stream": True}
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as response:
        lines = sse_lines(response)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "upstream_error" and "round 0" in error["message"]


# -- pass-through ------------------------------------------------------------------------------------

PASS_THROUGH = {
    "tools": {
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    },
    "n > 1": {"n": 2},
    "rsa false": {"rsa": False},
    "rsa disabled": {"rsa": {"enabled": False, "n": 64}},
}


@pytest.mark.parametrize("extra", PASS_THROUGH.values(), ids=PASS_THROUGH.keys())
def test_pass_through_rules(fake_backend: Any, proxy: Any, extra: dict[str, Any]) -> None:
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream).client()
    body = {"model": MODEL, "messages": PROBLEM, "temperature": 0.5, **extra}
    response = client.chat.completions.create(**{k: v for k, v in body.items() if k != "rsa"}, extra_body={
        k: v for k, v in body.items() if k == "rsa"
    })
    assert upstream.stats.requests == 1
    assert "rsa" not in (response.model_extra or {})
    assert len(response.choices) == body.get("n", 1)
    assert response.usage.model_dump(exclude_none=True) == upstream.stats.usage
    # The upstream saw the client's request, less the proxy's own key.
    assert upstream.stats.requests_log[-1] == {k: v for k, v in body.items() if k != "rsa"}


def test_pass_through_stream_is_relayed_chunk_by_chunk(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=40, tokens_per_second=300)
    client = proxy(upstream).client()
    stream = client.chat.completions.create(
        model=MODEL, messages=PROBLEM, stream=True, stream_options={"include_usage": True}, extra_body={"rsa": False}
    )
    arrivals = []
    chunks = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "\\boxed{" in content
    assert chunks[-1].usage.model_dump(exclude_none=True) == upstream.stats.usage
    # Relayed as generated (about 0.15 s of tokens), not in one piece at the end.
    assert arrivals[-1] - arrivals[0] > 0.05


def test_model_prefix_turns_rsa_on(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream, rsa_by_default=False).client()
    plain = client.chat.completions.create(model=MODEL, messages=PROBLEM)
    assert "rsa" not in (plain.model_extra or {}) and upstream.stats.requests == 1
    upstream.reset_stats()
    rsa = client.chat.completions.create(model="mrsa/" + MODEL, messages=PROBLEM)
    assert rsa.model_extra["rsa"]["requests"] == upstream.stats.requests == 8
    assert {entry["model"] for entry in upstream.stats.requests_log} == {MODEL}
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "mrsa/" + MODEL]


def test_per_request_overrides(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream).client()
    response = client.chat.completions.create(
        model=MODEL,
        messages=PROBLEM,
        temperature=0.3,
        max_tokens=77,
        extra_body={"rsa": {"n": 3, "k": 2, "t": 3, "tail_tokens": 0, "selection": "majority", "temperature": 0.9}},
    )
    rsa = response.model_extra["rsa"]
    assert (rsa["population"], rsa["rounds"], rsa["tail_tokens"]) == (3, 3, 0)
    assert rsa["requests"] == upstream.stats.requests == 9
    # Request-level sampling fields win over the rsa object, as on Zyphra's proxy.
    assert {(r["temperature"], r["max_tokens"]) for r in upstream.stats.requests_log} == {(0.3, 77)}
    # Zyphra's server-level knobs are accepted (and left to the server's configuration).
    client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": {"n": 2, "k": 1, "max_concurrency": 4}})


def test_invalid_rsa_parameters_are_400_naming_the_field(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend()
    running = proxy(upstream, max_request_tokens=10_000, strict_rsa=True)
    client = running.client()
    cases = [
        ({"rsa": {"n": -1}}, "rsa.n"),
        ({"rsa": {"tail_tokens": "many"}}, "rsa.tail_tokens"),
        ({"rsa": {"shards": 2}}, "rsa.shards"),
        ({"rsa": "yes"}, "rsa"),
        ({"temperature": 9.0}, "temperature"),
        ({"rsa": {"n": 16, "t": 2, "max_tokens": 1000}}, "rsa.max_tokens"),  # over the token cap
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body=extra)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param, extra
        assert caught.value.body["type"] == "invalid_request_error"
    for content, param in ((b"{not json", None), (json.dumps({"model": MODEL}).encode(), "messages")):
        response = httpx.post(running.base_url + "/chat/completions", content=content)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert upstream.stats.requests == 0


# -- limits and security -----------------------------------------------------------------------------


def test_api_keys(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20, api_key="upstream-secret")
    running = proxy(upstream, api_keys=["key-a", "key-b"], upstream_api_key="upstream-secret")
    for key in ("wrong", "key-a-", "upstream-secret"):
        with pytest.raises(openai.AuthenticationError) as caught:
            running.client(api_key=key).chat.completions.create(model=MODEL, messages=PROBLEM)
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        assert httpx.post(running.url + path, json={}).status_code == 401
    assert httpx.get(running.base_url + "/models").status_code == 401
    assert httpx.get(running.url + "/health").status_code == 200
    assert upstream.stats.requests == 0
    # The proxy sends its own upstream key, never the client's.
    client = running.client(api_key="key-b")
    assert client.chat.completions.create(model=MODEL, messages=PROBLEM).model_extra["rsa"]["requests"] == 8
    assert client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": False}).choices


def test_oversized_body_is_413(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend()
    running = proxy(upstream, max_body_bytes=4096)
    with pytest.raises(openai.APIStatusError) as caught:
        running.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    # Without a declared length, the body is counted as it arrives.
    chunks = iter([b'{"messages": "', b"y" * 5000, b'"}'])
    response = httpx.post(running.base_url + "/chat/completions", content=chunks)
    assert response.status_code == 413
    assert upstream.stats.requests == 0


def test_runs_past_the_limit_get_429(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=100, tokens_per_second=100)
    running = proxy(upstream, max_concurrent_runs=1, max_queued_runs=1)
    body = {"model": MODEL, "messages": PROBLEM, "stream": True}
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as first:
        assert first.status_code == 200
        with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=30) as queued:
            assert queued.status_code == 200  # waits for the slot, with heartbeats
            with pytest.raises(openai.RateLimitError) as caught:
                running.client().chat.completions.create(model=MODEL, messages=PROBLEM)
            assert caught.value.status_code == 429
            assert metric(running.metrics(), "markov_rsa_runs_queued") == 1
    # Pass-through requests are not RSA runs and are not held back.
    running.client().chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": False})
    wait_for(lambda: metric(running.metrics(), "markov_rsa_runs_active") == 0)


def test_metrics_move(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20)
    running = proxy(upstream)
    client = running.client()
    client.chat.completions.create(model=MODEL, messages=PROBLEM)
    client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": False})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": {"n": 0}})
    m = running.metrics()
    assert metric(m, "markov_rsa_requests_total", mode="rsa", outcome="ok") == 1
    assert metric(m, "markov_rsa_requests_total", mode="passthrough", outcome="ok") == 1
    assert metric(m, "markov_rsa_requests_total", outcome="invalid") == 1
    assert metric(m, "markov_rsa_runs_total", outcome="ok") == 1
    assert metric(m, "markov_rsa_rounds_total") == 2
    assert metric(m, "markov_rsa_rollouts_total", outcome="ok") == 8
    assert metric(m, "markov_rsa_upstream_requests_total", outcome="ok") >= upstream.stats.requests == 9
    tokens = metric(m, "markov_rsa_tokens_total", kind="prompt") + metric(m, "markov_rsa_tokens_total", kind="completion")
    assert tokens == upstream.stats.usage["total_tokens"]
    assert metric(m, "markov_rsa_request_duration_seconds_count", mode="rsa") == 2  # the 400 included
    assert metric(m, "markov_rsa_run_duration_seconds_count") == 1
    assert metric(m, "markov_rsa_requests_in_flight") == 0
    assert metric(m, "markov_rsa_upstream_healthy", upstream="upstream 1") == 1


# -- cancellation ------------------------------------------------------------------------------------


def _raw_post(url: str, body: dict[str, Any]) -> socket.socket:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_client_disconnect_cancels_the_run_upstream(fake_backend: Any, proxy: Any, stream: bool) -> None:
    upstream = fake_backend(length_mean=200, tokens_per_second=20)  # 10 s per rollout
    running = proxy(upstream)
    sock = _raw_post(running.url, {"model": MODEL, "messages": PROBLEM, "stream": stream})
    wait_for(lambda: upstream.stats.in_flight == 4)
    sock.close()
    wait_for(lambda: upstream.stats.cancelled == 4 and upstream.stats.in_flight == 0, timeout=5)
    assert upstream.stats.served == 0
    wait_for(lambda: metric(running.metrics(), "markov_rsa_runs_total", outcome="cancelled") == 1, timeout=5)
    assert metric(running.metrics(), "markov_rsa_runs_active") == 0


def test_client_disconnect_cancels_a_pass_through_call(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=200, tokens_per_second=20)
    running = proxy(upstream)
    sock = _raw_post(running.url, {"model": MODEL, "messages": PROBLEM, "rsa": False})
    wait_for(lambda: upstream.stats.in_flight == 1)
    sock.close()
    wait_for(lambda: upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0, timeout=5)


# -- upstream failures -------------------------------------------------------------------------------


def test_upstream_errors_keep_their_meaning(fake_backend: Any, proxy: Any) -> None:
    rejecting = fake_backend(length_mean=20, reject_fields=["stop"])
    client = proxy(rejecting).client()
    for extra in ({"rsa": False}, {}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=PROBLEM, stop=["\n\n\n"], extra_body=extra)
        assert caught.value.body["param"] == "stop" and "stop" in caught.value.body["message"]

    failing = fake_backend(fault_rate_5xx=1.0)
    client = proxy(failing, upstream_max_retries=0).client()
    for extra in ({"rsa": False}, {}):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body=extra)
        assert caught.value.status_code == 502 and caught.value.body["type"] == "upstream_error"
        # Clients learn what failed, not where the upstreams live.
        assert "503" in caught.value.body["message"] or "500" in caught.value.body["message"]
        assert str(failing.port) not in caught.value.body["message"]

    hanging = fake_backend(fault_rate_hang=1.0)
    client = proxy(hanging, upstream_timeout=0.3, upstream_max_retries=0).client()
    for extra in ({"rsa": False}, {}):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body=extra)
        assert caught.value.status_code == 504 and caught.value.body["type"] == "upstream_timeout"


def test_two_upstreams_one_killed_mid_run(fake_backend: Any, proxy: Any) -> None:
    first = fake_backend(length_mean=60, tokens_per_second=150, seed=1)
    second = fake_backend(length_mean=60, tokens_per_second=150, seed=2)
    running = proxy(first, second, defaults=RSAParams(n=8, k=2, t=2, tail_tokens=32, max_tokens=300))
    box: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: box.update(response=running.client().chat.completions.create(model=MODEL, messages=PROBLEM))
    )
    worker.start()
    # Least outstanding requests: round 0 is spread over both.
    wait_for(lambda: first.stats.in_flight >= 3 and second.stats.in_flight >= 3)
    first.stop()
    worker.join(60)
    response = box["response"]
    assert "\\boxed{" in response.choices[0].message.content
    rsa = response.model_extra["rsa"]
    assert rsa["failed"] == 0 and rsa["requests"] == 16
    assert second.stats.served > 8
    # Usage covers exactly the calls that were served, on either upstream.
    served = {k: first.stats.usage[k] + second.stats.usage[k] for k in second.stats.usage}
    assert response.usage.model_dump(exclude_none=True) == served
    m = running.metrics()
    assert metric(m, "markov_rsa_upstream_healthy", upstream="upstream 1") == 0
    assert metric(m, "markov_rsa_upstream_healthy", upstream="upstream 2") == 1
    assert httpx.get(running.url + "/ready").status_code == 200
    # Pass-through requests go to the survivor too.
    assert running.client().chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": False}).choices


def test_ready_needs_an_answering_upstream(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend()
    running = proxy(upstream)
    assert httpx.get(running.url + "/ready").status_code == 200
    upstream.stop()
    response = httpx.get(running.url + "/ready")
    assert response.status_code == 503 and response.json()["upstreams"][0]["healthy"] is False
    assert httpx.get(running.url + "/health").status_code == 200


# -- other endpoints and backends ----------------------------------------------------------------------


def test_completions_models_and_tokenize_pass_through(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20)
    running = proxy(upstream)
    client = running.client()
    completion = client.completions.create(model=MODEL, prompt="What is 2 + 2?", max_tokens=30)
    assert completion.choices[0].text and upstream.stats.requests == 1
    streamed = list(client.completions.create(model=MODEL, prompt="What is 2 + 2?", max_tokens=30, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    tokens = httpx.post(running.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    text = httpx.post(running.url + "/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    missing = httpx.get(running.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(running.base_url + "/chat/completions").status_code == 405


def test_backend_factory_serves_without_upstreams(fake_backend: Any, proxy: Any) -> None:
    upstream = fake_backend(length_mean=20)
    running = proxy(backend_factory=lambda: OpenAIBackend(upstream.base_url), model="local-model")
    client = running.client()
    rsa = client.chat.completions.create(model="local-model", messages=PROBLEM)
    assert rsa.model_extra["rsa"]["requests"] == 8 and rsa.usage.total_tokens == upstream.stats.usage["total_tokens"]
    upstream.reset_stats()
    plain = client.chat.completions.create(model="local-model", messages=PROBLEM, n=2, max_tokens=50)
    assert len(plain.choices) == 2 and upstream.stats.requests == 2
    assert plain.usage.total_tokens == upstream.stats.usage["total_tokens"]
    chunks = list(client.chat.completions.create(model="local-model", messages=PROBLEM, stream=True, extra_body={"rsa": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [m.id for m in client.models.list().data] == ["local-model", "mrsa/local-model"]


def test_prompts_are_logged_only_when_asked(fake_backend: Any, proxy: Any, caplog: pytest.LogCaptureFixture) -> None:
    upstream = fake_backend(length_mean=20)
    secret = [{"role": "user", "content": "What is 4 + 4? (private-marker-7731)"}]
    caplog.set_level("DEBUG", logger="markov_rsa")
    for log_prompts in (False, True):
        caplog.clear()
        client = proxy(upstream, log_prompts=log_prompts).client()
        client.chat.completions.create(model=MODEL, messages=secret)
        client.chat.completions.create(model=MODEL, messages=secret, extra_body={"rsa": False})
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert "rsa run ok" in logged
        assert ("private-marker-7731" in logged) is log_prompts
