"""The proxy against hostile and careless requests: cost caps, unreadable bodies, Zyphra's clients."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest
from test_proxy import MODEL, PROBLEM, proxy  # noqa: F401 - the fixture

from markov_rsa import RSAParams

# -- point 1: the cost cap counts every call ---------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        # The final aggregation call's budget alone takes the run over the cap.
        (
            {"rsa": {"n": 2, "k": 1, "t": 1, "max_tokens": 50, "selection": "final_agg",
                     "final_max_tokens": 1_000_000_000_000}},
            "rsa.final_max_tokens",
        ),
        # 'auto' may make a final call too: 2*1*4000 + 4000 > 10000.
        ({"rsa": {"n": 2, "k": 1, "t": 1, "max_tokens": 4000}}, "rsa.max_tokens"),
        # Request-level budgets are rollout budgets: each is named when it is the one too large.
        ({"rsa": {"n": 2, "k": 1, "t": 1}, "max_completion_tokens": 1_000_000_000_000}, "max_completion_tokens"),
        ({"rsa": {"n": 2, "k": 1, "t": 1}, "max_tokens": 1_000_000_000_000}, "max_tokens"),
    ],
)
def test_budget_counts_every_call_and_names_the_field(
    fake_backend: Any, proxy: Any, extra: dict[str, Any], param: str  # noqa: F811
) -> None:
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream, max_request_tokens=10_000).client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body=extra)
    assert caught.value.body["param"] == param
    assert caught.value.body["code"] == "budget_exceeded"
    assert param in caught.value.body["message"]
    assert upstream.stats.requests == 0


def test_budget_within_the_cap_runs(fake_backend: Any, proxy: Any) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream, max_request_tokens=10_000).client()
    rsa = {"n": 2, "k": 1, "t": 1, "max_tokens": 300, "selection": "final_agg", "final_max_tokens": 9_000}
    response = client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": rsa})
    assert response.model_extra["rsa"]["requests"] == upstream.stats.requests == 3
    assert upstream.stats.requests_log[-1]["max_tokens"] == 9_000


# -- point 2: bodies nested too deeply ----------------------------------------------------------------

DEEP_BODIES = [
    b"[" * 100_000,
    b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"rsa": false, "messages": [], "x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_deep_json_is_a_400_on_a_kept_connection(fake_backend: Any, proxy: Any, path: str) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=20)
    running = proxy(upstream)
    host, port = running.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for body in DEEP_BODIES:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            sock = connection.sock
            response = connection.getresponse()
            payload = json.loads(response.read())
            assert response.status == 400, payload
            assert set(payload["error"]) == {"message", "type", "param", "code"}
            assert response.getheader("connection") != "close"
            # The same connection answers the next request.
            connection.request("GET", "/health")
            again = connection.getresponse()
            assert again.status == 200 and json.loads(again.read()) == {"status": "ok"}
            assert connection.sock is sock
    finally:
        connection.close()


# -- point 7: Zyphra's clients --------------------------------------------------------------------------


def test_k_is_clamped_and_unknown_fields_are_ignored(fake_backend: Any, proxy: Any) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream, defaults=RSAParams(n=4, k=2, t=1, tail_tokens=32, max_tokens=300)).client()
    rsa = {"n": 2, "k": 4, "shards": 3, "max_retries": 2, "request_timeout": 5, "max_concurrency": 8, "verifier": "math"}
    response = client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": rsa})
    block = response.model_extra["rsa"]
    assert (block["population"], block["aggregation_size"]) == (2, 2)
    assert block["adjusted"]["k"]["requested"] == 4 and block["adjusted"]["k"]["used"] == 2
    server_knobs = ["max_retries", "request_timeout", "max_concurrency"]
    verifier_is_a_parameter = "verifier" in RSAParams.model_fields
    expected = ["shards", *server_knobs] + ([] if verifier_is_a_parameter else ["verifier"])
    assert sorted(block["ignored"]) == sorted(expected)
    assert upstream.stats.requests == 2
    # A default k above the requested population is clamped as well; nothing to ignore then.
    plain = client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": {"n": 1}})
    assert plain.model_extra["rsa"]["adjusted"] == {"k": {"requested": 2, "used": 1, "reason": "k must not exceed the population n=1"}}
    assert plain.model_extra["rsa"]["ignored"] == []


def test_streamed_answer_reports_the_adjustments(fake_backend: Any, proxy: Any) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=20)
    running = proxy(upstream)
    body = {"model": MODEL, "messages": PROBLEM, "stream": True, "rsa": {"n": 2, "k": 3, "t": 1, "colour": "red"}}
    with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=60) as response:
        frames = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    finals = [f["rsa"] for f in frames if "rsa" in f and f["choices"] and f["choices"][0].get("finish_reason")]
    assert len(finals) == 1
    assert finals[0]["adjusted"]["k"]["used"] == 2 and finals[0]["ignored"] == ["colour"]


def test_strict_rsa_restores_the_400s(fake_backend: Any, proxy: Any) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=20)
    client = proxy(upstream, strict_rsa=True).client()
    for rsa, param in (({"n": 2, "k": 4}, "rsa"), ({"n": 2, "k": 1, "shards": 3}, "rsa.shards")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=PROBLEM, extra_body={"rsa": rsa})
        assert caught.value.body["param"] == param
    assert upstream.stats.requests == 0
    # Zyphra's documented server knobs stay accepted.
    response = client.chat.completions.create(
        model=MODEL, messages=PROBLEM, extra_body={"rsa": {"n": 2, "k": 1, "t": 1, "max_retries": 3}}
    )
    assert response.model_extra["rsa"]["ignored"] == ["max_retries"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_strict_rsa_flag(fake_backend: Any) -> None:
    upstream = fake_backend(length_mean=20)
    port = _free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "markov-rsa")
    proc = subprocess.Popen(
        [cli, "serve", "--upstream", upstream.base_url, "--port", str(port), "--strict-rsa", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.05)
        body = {"model": MODEL, "messages": PROBLEM, "rsa": {"n": 2, "k": 4}}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "rsa"
    finally:
        proc.terminate()
        proc.wait(30)
