"""Reaching upstreams the way real deployments put them: HTTPS with a private CA, behind an HTTP
proxy, under a path prefix; and keeping their addresses from clients. Every path: ``solve`` (the
RSA path of the Python API and the CLI) and ``serve`` (RSA and pass-through)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from markov_rsa import TRUNCATION_MARKER, MarkovRSA, OpenAIBackend, RSAParams, RunError
from upstream_servers import ForwardProxy, RawUpstream, Request, response, well_behaved
from test_upstream_http import PARAMS, chat, solve, streamed_text

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy().start()
    yield proxy
    proxy.stop()


def get(url: str, **kwargs: Any) -> httpx.Response:
    # The test's own client goes straight to the proxy under test, whatever the environment says.
    return httpx.get(url, trust_env=False, timeout=30, **kwargs)


# -- HTTPS ---------------------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


def test_https_with_a_private_ca(raw_upstream: Any, serve_proxy: Any, clean_env: pytest.MonkeyPatch,
                                 tls: tuple[ssl.SSLContext, str]) -> None:
    context, ca_file = tls
    server = raw_upstream(well_behaved, tls=context)
    assert server.base_url.startswith("https://")
    clean_env.setenv("SSL_CERT_FILE", ca_file)
    assert solve(server.base_url).answer == "42"
    trusted = serve_proxy(server.base_url)
    assert get(trusted.url + "/ready").status_code == 200
    for rsa in (True, False):
        assert chat(trusted, rsa=rsa).status_code == 200
    assert streamed_text(chat(trusted, rsa=False, stream=True)).endswith("\\boxed{42}.")

    # The system store does not know this CA: one clear certificate error, never retried.
    clean_env.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(RunError) as caught:
        solve(server.base_url, max_retries=3, backoff_base=0.01)
    assert "certificate" in str(caught.value).lower()
    untrusted = serve_proxy(server.base_url)
    assert get(untrusted.url + "/ready").status_code == 503
    for rsa in (True, False):
        reply = chat(untrusted, rsa=rsa)
        assert reply.status_code == 502 and "certificate" in reply.json()["error"]["message"].lower()
        assert str(server.port) not in reply.text


def test_cli_solve_over_https(raw_upstream: Any, tls: tuple[ssl.SSLContext, str]) -> None:
    context, ca_file = tls
    server = raw_upstream(well_behaved, tls=context)
    cli = [str(Path(sys.executable).parent / "markov-rsa"), "solve", "What is 17 + 25?", "--backend", server.base_url,
           "--model", "m", "--n", "2", "--k", "2", "--t", "1", "--selection", "majority", "--max-retries", "0"]
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    ok = subprocess.run(cli, env={**env, "SSL_CERT_FILE": ca_file}, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "42", ok.stderr
    bad = subprocess.run(cli, env={**env, "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "certificate" in bad.stderr.lower() and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# -- HTTP proxies --------------------------------------------------------------------------------------


def test_a_host_reachable_only_through_an_http_proxy(raw_upstream: Any, serve_proxy: Any, clean_env: pytest.MonkeyPatch,
                                                     forward_proxy: ForwardProxy) -> None:
    server = raw_upstream(well_behaved)
    # No resolver knows this name; only the forward proxy can reach it.
    hidden = f"http://upstream.invalid:{server.port}/v1"
    clean_env.setenv("HTTP_PROXY", forward_proxy.url)
    assert solve(hidden).answer == "42"
    assert any(target.startswith("http://upstream.invalid:") for target in forward_proxy.forwarded)
    behind = serve_proxy(hidden)
    # Probes go the way requests go: /ready agrees with what requests can reach.
    assert get(behind.url + "/ready").status_code == 200
    for rsa in (True, False):
        assert chat(behind, rsa=rsa).status_code == 200
    assert streamed_text(chat(behind, rsa=False, stream=True)).endswith("\\boxed{42}.")

    # NO_PROXY is respected: the name is then looked up directly, and fails clearly.
    clean_env.setenv("NO_PROXY", "upstream.invalid")
    forwarded = len(forward_proxy.forwarded)
    with pytest.raises(RunError, match="cannot connect"):
        solve(hidden, max_retries=0)
    direct = serve_proxy(hidden)
    assert get(direct.url + "/ready").status_code == 503
    reply = chat(direct, rsa=False)
    assert reply.status_code == 502 and "upstream.invalid" not in reply.text
    # And a host listed in NO_PROXY that resolves is reached without the proxy.
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    assert solve(server.base_url).answer == "42"
    assert len(forward_proxy.forwarded) == forwarded


# -- path prefixes and tokenizer routes --------------------------------------------------------------------


def byte_tokens(text: str) -> list[int]:
    """The stand-in tokenizer: one token per UTF-8 byte."""
    return list(text.encode())


def prefixed(prefix: str) -> Callable[[Request, asyncio.StreamWriter, RawUpstream], Any]:
    """A vLLM-like server that lives under ``prefix`` only (as behind a path-routing gateway)."""

    async def handler(request: Request, writer: asyncio.StreamWriter, server: RawUpstream) -> bool:
        if not request.target.startswith(prefix + "/"):
            writer.write(response(404, b'{"error": "not found"}'))
            return True
        path = request.target[len(prefix):]
        if path == "/tokenize":
            writer.write(response(200, json.dumps({"tokens": byte_tokens(request.json["prompt"])}).encode()))
            return True
        if path == "/detokenize":
            text = bytes(request.json["tokens"]).decode(errors="replace")
            writer.write(response(200, json.dumps({"prompt": text}).encode()))
            return True
        return await well_behaved(request, writer, server)

    return handler


def test_a_base_url_with_a_path_prefix(raw_upstream: Any, serve_proxy: Any) -> None:
    server = raw_upstream(prefixed("/some/prefix"))
    base = server.origin + "/some/prefix/v1"
    params = RSAParams(n=2, k=2, t=2, tail_tokens=16, selection="majority", max_tokens=50, seed=1)

    async def run() -> Any:
        async with OpenAIBackend(base, "m") as backend:
            return await MarkovRSA(backend, params).solve("What is 17 + 25?")

    result = asyncio.run(run())
    assert result.answer == "42" and result.tokenizer == "remote"
    tails = [tail for record in result.population for tail in record.shown_tails or []]
    assert tails and all(len(t.removeprefix(TRUNCATION_MARKER + "\n").encode()) <= 16 for t in tails)
    assert any(r.target == "/some/prefix/tokenize" for r in server.requests)

    proxy = serve_proxy(base, defaults=params)
    for rsa in (True, False):
        assert chat(proxy, rsa=rsa).status_code == 200
    for path, body in (("/tokenize", {"model": "m", "prompt": "Hi"}), ("/detokenize", {"model": "m", "tokens": [72, 105]})):
        reply = httpx.post(proxy.url + path, json=body, trust_env=False, timeout=30)
        assert reply.status_code == 200, reply.text
    assert reply.json() == {"prompt": "Hi"}
    assert [r.target for r in server.requests].count("/some/prefix/tokenize") >= 2


# -- nothing of the upstream reaches clients --------------------------------------------------------------


def test_no_upstream_address_in_any_client_facing_body(raw_upstream: Any, serve_proxy: Any) -> None:
    server = raw_upstream(prefixed("/p"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    base = server.origin + "/p/v1"
    secret = "s3cret"
    proxy = serve_proxy(base, api_keys=[secret], defaults=PARAMS.model_copy(update={"t": 2}))
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "What is 17 + 25?"}]}
    reply = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=auth, trust_env=False, timeout=60)
    assert reply.status_code == 200 and reply.json()["rsa"]["tokenizer"] == "remote"
    bodies = [reply.text, get(proxy.url + "/ready").text, get(proxy.url + "/metrics").text]
    # With the key, /ready shows the operator where the upstreams are.
    assert base in get(proxy.url + "/ready", headers=auth).text
    failing = serve_proxy(dead, api_keys=[secret], upstream_max_retries=0)
    for rsa in (True, False):
        reply = httpx.post(failing.url + "/v1/chat/completions", json={**body, "rsa": rsa}, headers=auth,
                           trust_env=False, timeout=60)
        assert reply.status_code == 502 and "upstream 1" in reply.json()["error"]["message"]
        bodies.append(reply.text)
    bodies += [get(failing.url + "/ready").text, get(failing.url + "/metrics").text]
    for text in bodies:
        assert "127.0.0.1" not in text and str(server.port) not in text, text[:300]
