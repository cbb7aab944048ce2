"""The ``markov-rsa`` command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CLI = str(Path(sys.executable).parent / "markov-rsa")


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_solve_json(fake_backend: Any) -> None:
    server = fake_backend(length_mean=60, error_rate=0.0, aggregation_error_rate=0.0)
    proc = cli(
        "solve", "What is 6 * 7?", "--backend", server.base_url, "--preset", "smoke", "--seed", "3", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["answer"] == "42"
    assert data["calls"] == 4 * 2 == len(server.stats.requests_log)
    assert data["usage"] == server.stats.usage
    assert data["selection"] == "majority"
    assert data["tokenizer"] == "remote"
    assert [r["round"] for r in data["rounds"]] == [0, 1]
    assert len(data["rounds"][0]["answers"]) == 4
    assert data["rounds"][0]["finish_reasons"] == ["stop"] * 4
    assert data["final_text"]


def test_solve_plain_reads_stdin_and_prints_answer(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0)
    proc = cli(
        "solve", "-", "--backend", server.base_url, "--n", "3", "--k", "2", "--t", "2", "--tail-tokens", "30",
        "--max-tokens", "200", stdin="What is 100 - 58?",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"
    assert "round" not in proc.stderr  # no progress display when stderr is not a terminal


def test_env_vars_set_parameters(fake_backend: Any) -> None:
    server = fake_backend(length_mean=40)
    proc = cli(
        "solve", "What is 1 + 1?", "--json", "--max-tokens", "200",
        env={"MARKOV_RSA_BACKEND": server.base_url, "MARKOV_RSA_N": "3", "MARKOV_RSA_K": "2", "MARKOV_RSA_T": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"]["n"] == 3 and data["params"]["t"] == 1 and data["calls"] == 3


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--n", "2", "--k", "5"], ["k (5) must not exceed n (2)"]),
        (["--tail-tokens", "-1"], ["--tail-tokens"]),
        (["--preset", "nope"], ["unknown preset"]),
        (["--selection", "best"], []),
    ],
)
def test_bad_parameters(fake_backend: Any, args: list[str], needles: list[str]) -> None:
    server = fake_backend()
    proc = cli("solve", "What is 1 + 1?", "--backend", server.base_url, *args)
    if args[0] == "--selection":
        # typer's own choice validation; still no traceback and a non-zero exit
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        return
    assert_one_line_error(proc, *needles)
    assert server.stats.requests == 0


def test_unreachable_backend() -> None:
    proc = cli("solve", "What is 1 + 1?", "--backend", "http://127.0.0.1:9/v1")
    assert_one_line_error(proc, "cannot use backend", "127.0.0.1:9")


def test_empty_problem(fake_backend: Any) -> None:
    server = fake_backend()
    assert_one_line_error(cli("solve", "   ", "--backend", server.base_url), "empty")
    assert_one_line_error(cli("solve", "-", "--backend", server.base_url, stdin=""), "empty")


def test_wrong_api_key_is_one_line(fake_backend: Any) -> None:
    server = fake_backend(api_key="secret")
    proc = cli("solve", "What is 1 + 1?", "--backend", server.base_url, "--api-key", "wrong")
    assert_one_line_error(proc, "401")


def test_help_lists_every_parameter() -> None:
    proc = cli("solve", "--help")
    assert proc.returncode == 0
    for flag in ("--n", "--k", "--t", "--tail-tokens", "--max-tokens", "--temperature", "--top-p", "--top-k",
                 "--seed", "--selection", "--task", "--preset", "--backend", "--model", "--backend-api-key", "--concurrency",
                 "--json"):
        assert flag in proc.stdout, flag
    top = cli("--help")
    assert top.returncode == 0 and "solve" in top.stdout and "fake-backend" in top.stdout


def test_serve_command_proxies_with_rsa(fake_backend: Any) -> None:
    import socket
    import time

    import httpx

    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [CLI, "serve", "--upstream", server.base_url, "--port", str(port), "--preset", "smoke", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "fake-reasoner", "messages": [{"role": "user", "content": "What is 6 * 7?"}],
                  "rsa": {"n": 3, "k": 2, "t": 2}},
            timeout=60,
        ).json()
        assert "\\boxed{42}" in reply["choices"][0]["message"]["content"]
        assert reply["rsa"]["population"] == 3
        assert reply["usage"] == server.stats.usage
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_without_upstream_is_one_line() -> None:
    proc = cli("serve", "--port", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--backend" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rps", "-1"], "--rps"),
        (["--run-dir", "/etc/passwd"], "run log"),
        (["--backend", "http://127.0.0.1:99999/v1"], "invalid backend URL"),
        (["--api-key", "clé"], "ASCII"),
    ],
)
def test_bad_backend_and_file_flags(fake_backend: Any, args: list[str], needle: str) -> None:
    server = fake_backend()
    # The backend comes from the environment, so that a --backend flag overrides it.
    proc = cli("solve", "What is 1 + 1?", "--preset", "smoke", *args, env={"MARKOV_RSA_BACKEND": server.base_url})
    assert_one_line_error(proc, needle)
