"""The verifier filter: finds candidates that are provably broken, so that they leave the
aggregation pool and the vote. It never picks a winner; anything it cannot prove broken stays."""

from __future__ import annotations

import asyncio

from ._answers import _math_verify, _symbolic_allowed, extract_answer, normalize_answer
from ._params import Task, Verifier
from ._sandbox import Sandbox
from ._types import Trace

# Exceptions a correct stdin-reading program raises when run with no input at all.
_INPUT_STARVED = frozenset({"EOFError", "IndexError", "ValueError", "StopIteration"})
# Seconds a math parse may take (math-verify has no timeout off the main thread); past it the
# answer is kept, as nothing was proven.
_PARSE_WAIT_S = 5.0


def effective_verifier(verifier: Verifier, task: Task) -> Verifier:
    """What ``verifier`` means for ``task``: ``auto`` checks math answers only, since running code
    is never switched on implicitly."""
    if verifier == Verifier.auto:
        return Verifier.math if task == Task.math else Verifier.off
    return verifier


def _unparsable(answer: str) -> bool:
    tools = _math_verify()
    text = normalize_answer(answer, "math")
    if tools is None or not _symbolic_allowed(text):
        return False  # words, huge expressions: nothing proven
    try:
        parsed = tools.parse(f"${text}$", parsing_timeout=None)
    except Exception:  # noqa: BLE001 - a parser crash on this input is a failure to parse
        return True
    return not any(not isinstance(item, str) for item in parsed)


class CandidateVerifier:
    """Checks finished traces of one kind (``math`` or ``code``); one per run."""

    def __init__(self, kind: Verifier, sandbox: Sandbox | None = None) -> None:
        if kind not in (Verifier.math, Verifier.code):
            raise ValueError(f"no checks for verifier {kind.value!r}")
        self.kind = kind
        self.sandbox = sandbox or (Sandbox() if kind == Verifier.code else None)

    async def check(self, trace: Trace, answer: str | None) -> str | None:
        """Why the trace is provably broken, or None when it stays a candidate."""
        if self.kind == Verifier.math:
            return await self._check_math(answer)
        return await self._check_code(trace)

    async def _check_math(self, answer: str | None) -> str | None:
        if answer is None or not answer.strip():
            return "no final answer"
        try:
            broken = await asyncio.wait_for(asyncio.to_thread(_unparsable, answer), _PARSE_WAIT_S)
        except TimeoutError:
            return None
        return f"final answer does not parse: {answer[:80]}" if broken else None

    async def _check_code(self, trace: Trace) -> str | None:
        program = extract_answer(trace.content or trace.text, "code")
        if program is None:
            return "no code block"
        assert self.sandbox is not None
        run = await self.sandbox.run(program)
        if run.status == "timeout":
            return "ran past the time limit with no input"
        if run.status == "limit":
            return f"stopped by the sandbox limits ({run.error_type or 'killed'})"
        if run.status == "error" and run.error_type not in _INPUT_STARVED:
            return f"raised {run.error_type or f'exit status {run.returncode}'}"
        return None
