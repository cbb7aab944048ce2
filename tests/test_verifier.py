"""The verifier filter and the sandbox it runs code in."""

from __future__ import annotations

from typing import Any

import pytest
from test_proxy import proxy  # noqa: F401 - the fixture

from markov_rsa import MarkovRSA, OpenAIBackend, RolloutFinished, RSAParams, Trace
from markov_rsa._params import Verifier
from markov_rsa._sandbox import Sandbox, SandboxLimits
from markov_rsa._verifier import CandidateVerifier, effective_verifier

PROBLEM = "What is 17 + 25 * 3?"
SCRIPT = ["The sum is \\boxed{92}.", "I ran out of time.", "So \\boxed{\\sqrt{2}+}.", "Done: \\boxed{92}."]
LIMITS = SandboxLimits(cpu_s=1, wall_s=4, memory_bytes=256 * 2**20)


def program(code: str) -> Trace:
    return Trace(content=f"Here is my solution.\n\n```python\n{code}\n```\n")


async def run(server: Any, params: RSAParams) -> tuple[Any, dict[tuple[int, int], Any]]:
    records: dict[tuple[int, int], Any] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, RolloutFinished):
            records[(event.record.round, event.record.slot)] = event.record

    async with OpenAIBackend(server.base_url) as backend:
        result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
    return result, records


@pytest.mark.parametrize("schedule", ["dataflow", "rounds"])
async def test_math_verifier_excludes_broken_candidates_from_pool_and_vote(fake_backend: Any, schedule: str) -> None:
    # Scripted answers cycle in arrival order: each round gets two good answers, one without an
    # answer and one whose answer does not parse.
    server = fake_backend(script=SCRIPT)
    params = RSAParams(n=4, k=2, t=2, tail_tokens=30, max_tokens=200, seed=3, selection="majority",
                       verifier="math", schedule=schedule)
    result, records = await run(server, params)
    round0 = [records[(0, s)] for s in range(4)]
    reasons = sorted(r.excluded or "" for r in round0)
    assert reasons[:2] == ["", ""]
    assert reasons[2].startswith("final answer does not parse") and reasons[3] == "no final answer"
    good = {r.slot for r in round0 if r.excluded is None}
    for slot in range(4):
        assert set(records[(1, slot)].parents) == good  # K=2 = exactly the two that passed
    summary = result.rounds[0]
    assert summary.excluded == 2 and not summary.verifier_fallback
    assert summary.votes == [("92", 2)]
    assert result.rounds[1].excluded == 2 and result.rounds[1].votes == [("92", 2)]
    assert result.answer == "92"


async def test_math_verifier_falls_back_to_the_whole_population_below_k(fake_backend: Any) -> None:
    server = fake_backend(script=SCRIPT)
    params = RSAParams(n=4, k=3, t=2, tail_tokens=30, max_tokens=200, seed=3, selection="majority",
                       verifier="math")
    result, records = await run(server, params)
    assert result.rounds[0].excluded == 2 and result.rounds[0].verifier_fallback
    # Only two passed, fewer than K=3: every aggregation drew from all four as usual.
    excluded = {s for s in range(4) if records[(0, s)].excluded}
    assert any(set(records[(1, s)].parents) & excluded for s in range(4))
    assert sum(c for _, c in result.rounds[0].votes) == 3  # 92 twice and \sqrt{2}+ once (the vote skips no answer)


def test_auto_never_runs_code() -> None:
    assert effective_verifier(Verifier.auto, "math") == Verifier.math  # type: ignore[arg-type]
    assert effective_verifier(Verifier.auto, "code") == Verifier.off  # type: ignore[arg-type]
    assert effective_verifier(Verifier.code, "code") == Verifier.code  # type: ignore[arg-type]


async def test_code_verifier_keeps_programs_that_run_and_excludes_broken_ones() -> None:
    verifier = CandidateVerifier(Verifier.code, Sandbox(LIMITS))
    # A stdin program run without input fails reading it: not proof that it is broken.
    assert await verifier.check(program("n = int(input())\nprint(n * 2)"), None) is None
    assert await verifier.check(program("print(sum(range(10)))"), None) is None
    assert (await verifier.check(program("print(undefined_name)"), None)) == "raised NameError"
    assert "SyntaxError" in (await verifier.check(program("def f(:\n    pass"), None) or "")
    assert await verifier.check(Trace(content="I would loop over the input."), None) == "no code block"
    hang = await verifier.check(program("while True:\n    pass"), None)
    assert hang is not None and ("limit" in hang)


async def test_sandbox_stops_hanging_and_memory_eating_programs() -> None:
    sandbox = Sandbox(LIMITS)
    ok = await sandbox.run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", "1 2 3\n")
    assert (ok.status, ok.stdout) == ("ok", "6\n")
    sleeper = await sandbox.run("import time\ntime.sleep(120)")
    assert sleeper.status == "timeout" and sleeper.stopped_by_limits
    spinner = await sandbox.run("while True:\n    pass")
    assert spinner.status in ("limit", "timeout") and spinner.stopped_by_limits
    hog = await sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))")
    assert hog.status == "limit" and hog.error_type == "MemoryError"
    flood = await sandbox.run("while True:\n    print('x' * 10000)")
    assert flood.stopped_by_limits and len(flood.stdout) <= LIMITS.output_bytes
    child = await sandbox.run("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\nprint('started')")
    assert child.status == "ok" and child.stdout == "started\n"  # the group is killed when the program ends


def test_the_proxy_refuses_the_code_verifier_unless_its_operator_enabled_it(fake_backend: Any, proxy: Any) -> None:
    import httpx

    upstream = fake_backend(length_mean=30)
    body = {"model": "fake-reasoner", "messages": [{"role": "user", "content": PROBLEM}],
            "rsa": {"verifier": "code", "task": "code"}}
    for stream in (False, True):
        running = proxy(upstream)
        response = httpx.post(running.base_url + "/chat/completions", json={**body, "stream": stream}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "rsa.verifier" and "runs model output" in error["message"]
    assert upstream.stats.requests == 0
    small = RSAParams(n=2, k=2, t=1, tail_tokens=32, max_tokens=200, verifier="code", task="code")
    enabled = proxy(upstream, defaults=small)
    response = httpx.post(enabled.base_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
