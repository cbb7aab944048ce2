"""Property: whatever a client sends to any route of the proxy, the answer is never a 5xx, every 4xx
is an OpenAI-shaped error, nothing logs a traceback, and the proxy keeps answering."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proxy import MODEL, proxy  # noqa: F401 - the fixture

from markov_rsa import RSAParams

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/healthz"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("DELETE", "/v1/models"),
]
# The chat route is where bodies are read most; it gets most of the examples.
ROUTE = st.one_of(st.just(ROUTES[0]), st.just(ROUTES[0]), st.sampled_from(ROUTES))

SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.sampled_from([0, -1, 2**31, 10**20, -(10**20)]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
RSA_KEYS = [*RSAParams.model_fields, "enabled", "progress", "verifier", "max_concurrency", "request_timeout",
            "max_retries", "shards"]
RSA = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(RSA_KEYS), SCALAR, max_size=5),
)
GOOD_MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
MESSAGES = st.one_of(
    st.just(GOOD_MESSAGES),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                                   optional={"content": JSON}), max_size=3),
    JSON,
)
CHAT_KEYS = ["stream", "n", "tools", "functions", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "top_k", "seed", "stop", "stream_options", "chat_template_kwargs", "logprobs", "prompt", "tokens",
             "return_token_ids", "echo", "response_format"]
CHAT_BODY = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"messages": MESSAGES}, optional={"model": st.sampled_from([MODEL, "mrsa/" + MODEL, "", 3]),
                                                           "rsa": RSA}),
    st.dictionaries(st.sampled_from(CHAT_KEYS), JSON, max_size=3),
)
BODY = st.one_of(
    CHAT_BODY.map(lambda body: json.dumps(body).encode()),
    CHAT_BODY.map(lambda body: json.dumps(body).encode()),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.just(b""),
)
# Framing headers are the HTTP layer's, not the app's: a client library sets them itself.
HEADER_NAME = st.one_of(
    st.sampled_from(["authorization", "content-type", "accept", "accept-encoding", "content-encoding",
                     "x-request-id", "openai-organization", "user-agent", "cookie"]),
    st.from_regex(r"x-[a-z0-9-]{1,12}", fullmatch=True),
)
# Values as HTTP carries them: visible ASCII, no surrounding whitespace.
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
HEADERS = st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=4)


class _Tracebacks(logging.Handler):
    """Collects every log record that carries an exception."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)


@pytest.fixture
def tracebacks() -> Iterator[_Tracebacks]:
    handler = _Tracebacks()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "markov_rsa")]
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def is_openai_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()


def test_random_requests_never_break_the_proxy(fake_backend: Any, proxy: Any, tracebacks: _Tracebacks) -> None:  # noqa: F811
    upstream = fake_backend(length_mean=12)
    running = proxy(
        upstream,
        defaults=RSAParams(n=2, k=1, t=1, tail_tokens=16, max_tokens=40),
        max_request_tokens=2_000,
        max_body_bytes=64 * 1024,
    )
    # Watch the loggers once the servers have configured theirs.
    for name in ("", "uvicorn", "uvicorn.error", "markov_rsa"):
        logging.getLogger(name).addHandler(tracebacks)
    client = httpx.Client(base_url=running.url, timeout=120)

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(route=ROUTE, body=BODY, headers=HEADERS)
    def answers_cleanly(route: tuple[str, str], body: bytes, headers: dict[str, str]) -> None:
        method, path = route
        response = client.request(method, path, content=body, headers=headers)
        response.read()
        assert response.status_code < 500, (response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert is_openai_error(response), (response.status_code, response.text[:300])
        assert not tracebacks.records, tracebacks.records[0].getMessage()

    try:
        answers_cleanly()
        assert client.get("/health").json() == {"status": "ok"}
        assert httpx.get(running.url + "/health").status_code == 200
    finally:
        client.close()
