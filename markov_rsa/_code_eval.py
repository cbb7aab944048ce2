"""Code answers scored by running them: each program against a problem's stdin/stdout tests, in the
sandbox (so it executes model output on this machine; see :mod:`markov_rsa._sandbox`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._sandbox import Sandbox, normalise_output, same_output

NO_PROGRAM = "no program"


@dataclass(frozen=True)
class IOTest:
    """One stdin/stdout pair (LiveCodeBench style)."""

    input: str
    output: str


def parse_tests(value: Any) -> list[IOTest]:
    """A dataset line's ``tests``: a non-empty list of ``{"input": str, "output": str}``.

    Raises ValueError saying what is wrong.
    """
    if not isinstance(value, list) or not value:
        raise ValueError("'tests' must be a non-empty list of {\"input\", \"output\"} objects")
    tests = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not isinstance(item.get("output"), str):
            raise ValueError(f"tests[{i}] must be an object with string 'input' and 'output'")
        tests.append(IOTest(item["input"], item["output"]))
    return tests


@dataclass(frozen=True)
class Behaviour:
    """What one program did on a problem's tests."""

    verdict: str
    """``pass`` (every test), ``fail`` (ran, wrong output), ``error``, ``timeout``, ``limit`` (the
    first test it did not pass ended so), or ``no program``."""
    signature: tuple[str, ...]
    """Per test: the normalised output, or how the run ended; equal signatures = identical behaviour."""

    @property
    def passed(self) -> bool:
        """Whether every test passed."""
        return self.verdict == "pass"


class CodeJudge:
    """Runs programs against one problem's tests; identical programs run once."""

    def __init__(self, sandbox: Sandbox, tests: Sequence[IOTest]) -> None:
        self.sandbox = sandbox
        self.tests = list(tests)
        self._runs: dict[str, asyncio.Future[Behaviour]] = {}

    async def behaviour(self, program: str | None) -> Behaviour:
        """The behaviour of ``program`` (None or blank: no program)."""
        if program is None or not program.strip():
            return Behaviour(NO_PROGRAM, (NO_PROGRAM,))
        pending = self._runs.get(program)
        if pending is None:
            pending = self._runs[program] = asyncio.ensure_future(self._judge(program))
        return await asyncio.shield(pending)

    async def _judge(self, program: str) -> Behaviour:
        runs = await asyncio.gather(*(self.sandbox.run(program, test.input) for test in self.tests))
        signature = []
        verdict = "pass"
        for test, run in zip(self.tests, runs):
            if run.status == "ok":
                signature.append(normalise_output(run.stdout))
                if verdict == "pass" and not same_output(run.stdout, test.output):
                    verdict = "fail"
            else:
                signature.append(f"<{run.status}:{run.error_type or run.returncode}>")
                if verdict == "pass":
                    verdict = run.status
        return Behaviour(verdict, tuple(signature))


def majority_behaviour(behaviours: Sequence[Behaviour]) -> Behaviour | None:
    """The most common behaviour among the programs (ties: first seen); None without programs."""
    counts: dict[tuple[str, ...], list[Behaviour]] = {}
    for b in behaviours:
        if b.verdict != NO_PROGRAM:
            counts.setdefault(b.signature, []).append(b)
    if not counts:
        return None
    return max(counts.values(), key=len)[0]
