"""Code answers scored by running them against stdin/stdout tests, in the sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from markov_rsa import OpenAIBackend, RSAParams
from markov_rsa._code_eval import CodeJudge, IOTest, majority_behaviour
from markov_rsa._eval import evaluate, load_dataset
from markov_rsa._sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(cpu_s=1, wall_s=4, memory_bytes=256 * 2**20)
DATASET = Path(__file__).resolve().parent.parent / "datasets" / "code_example.jsonl"
TESTS = [IOTest("2 3\n", "5\n"), IOTest("-7 10\n", "3\n")]
RIGHT = "a, b = map(int, input().split())\nprint(a + b)"
RIGHT_TOO = "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))"
WRONG = "a, b = map(int, input().split())\nprint(a * b)"
HANGS = "import time\nwhile True:\n    time.sleep(1)"
EATS_MEMORY = "hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 2**20))"


def fenced(code: str) -> str:
    return f"My program:\n\n```python\n{code}\n```\n"


async def test_programs_are_judged_by_their_tests_and_stopped_by_the_limits() -> None:
    judge = CodeJudge(Sandbox(LIMITS), TESTS)
    assert (await judge.behaviour(RIGHT)).verdict == "pass"
    assert (await judge.behaviour(RIGHT_TOO)).verdict == "pass"
    wrong = await judge.behaviour(WRONG)
    assert wrong.verdict == "fail" and wrong.signature == ("6", "-70")
    assert (await judge.behaviour(HANGS)).verdict == "timeout"
    assert (await judge.behaviour(EATS_MEMORY)).verdict == "limit"
    assert (await judge.behaviour(None)).verdict == "no program"
    # Identical behaviour, different code: one cluster, and it passes.
    behaviours = [await judge.behaviour(p) for p in (WRONG, RIGHT, RIGHT_TOO, HANGS)]
    winner = majority_behaviour(behaviours)
    assert winner is not None and winner.passed


async def test_eval_scores_code_by_tests(fake_backend: Any, tmp_path: Path) -> None:
    dataset = tmp_path / "code.jsonl"
    dataset.write_text(
        json.dumps({"id": "sum", "problem": "Read a and b, print a + b.",
                    "tests": [{"input": t.input, "output": t.output} for t in TESTS]}) + "\n"
    )
    problems, errors = load_dataset(dataset)
    assert not errors.lines and problems[0].task.value == "code" and len(problems[0].tests or []) == 2
    # Five rollouts per round, answered in arrival order: two right programs (different code, same
    # behaviour), one wrong, one that hangs, one that eats memory.
    server = fake_backend(script=[fenced(p) for p in (RIGHT, WRONG, RIGHT_TOO, HANGS, EATS_MEMORY)])
    params = RSAParams(n=5, k=2, t=1, tail_tokens=50, max_tokens=300, seed=1, selection="majority", task="code")
    async with OpenAIBackend(server.base_url) as backend:
        [outcome] = await evaluate(problems, backend, params, sandbox=Sandbox(LIMITS))
    assert outcome.error is None
    assert sorted(outcome.verdicts_by_round[0]) == ["fail", "limit", "pass", "pass", "timeout"]
    assert sum(outcome.correct_by_round[0]) == 2
    assert outcome.majority_by_round == [True]  # the two right programs behave identically
    assert outcome.final_correct == (outcome.result.answer in (RIGHT, RIGHT_TOO))


def test_example_code_dataset_loads_and_bad_tests_are_reported(tmp_path: Path) -> None:
    problems, errors = load_dataset(DATASET)
    assert len(problems) >= 5 and not errors.lines
    assert all(p.task.value == "code" and p.tests for p in problems)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "problem": "p", "tests": []}\n'
        '{"id": "b", "problem": "p", "tests": [{"input": 1, "output": "2"}]}\n'
        '{"id": "c", "problem": "p", "task": "math", "tests": [{"input": "1", "output": "2"}]}\n'
    )
    problems, errors = load_dataset(bad)
    assert not problems
    assert [n for n, _ in errors.lines] == [1, 2, 3]
    assert "non-empty list" in errors.lines[0][1] and "tests[0]" in errors.lines[1][1]
    assert "task 'code'" in errors.lines[2][1]


async def test_the_example_programs_pass_their_own_tests() -> None:
    # A reference solution per example problem, so the dataset's tests are known to be right.
    solutions = {
        "sum-two": RIGHT,
        "reverse-words": "print(' '.join(reversed(input().split())))",
        "count-vowels": "print(sum(c in 'aeiou' for c in input()))",
        "max-of-list": "input()\nprint(max(map(int, input().split())))",
        "fizzbuzz-n": "for i in range(1, int(input()) + 1):\n    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 "
                      "else 'Buzz' if i % 5 == 0 else i)",
        "is-prime": "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')",
    }
    problems, _ = load_dataset(DATASET)
    sandbox = Sandbox(SandboxLimits(cpu_s=2, wall_s=10))
    for problem in problems:
        behaviour = await CodeJudge(sandbox, problem.tests or []).behaviour(solutions[problem.id])
        assert behaviour.passed, (problem.id, behaviour)
