"""Evaluation over a dataset: accuracy per round (mean@N, majority, pass@N), tokens, calls, time."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._answers import answers_equivalent
from ._code_eval import CodeJudge, IOTest, majority_behaviour, parse_tests
from ._backend import Backend
from ._controller import MarkovRSA, early_stop_share
from ._datasets import BadRow, Fields, identify, read_rows
from ._errors import MarkovRSAError
from ._params import RSAParams, Task
from ._result import RoundSummary, RSAResult
from ._runlog import LOG_NAME, RunLog, logged_result, read_run_log
from ._sandbox import Sandbox
from ._stats import MeanSE, mean_se


@dataclass
class Problem:
    """One dataset item."""

    id: str
    problem: str
    answer: str
    task: Task
    line: int
    tests: list[IOTest] | None = None
    """stdin/stdout tests of a code problem: its programs are scored by running them."""


@dataclass
class DatasetErrors:
    """Lines of a dataset that could not be used, with why."""

    lines: list[tuple[int, str]] = field(default_factory=list)


def _present(value: object) -> bool:
    return value is not None and bool(str(value).strip())


def load_dataset(
    path: str | Path, default_task: Task = Task.math, fields: Fields | None = None
) -> tuple[list[Problem], DatasetErrors]:
    """Read a dataset: a built-in name, a JSONL, CSV or Parquet file, or ``hf:ORG/NAME[:split]``
    (see :func:`read_rows`), with ``id``, ``problem``, ``answer`` and optional ``task`` columns
    (``fields`` renames them); a code problem may carry ``tests``, a list of ``{"input", "output"}``
    stdin/stdout pairs, instead of an ``answer``. Bad rows are reported with their line numbers and
    skipped; the rest is returned."""
    fields = fields or Fields()
    problems: list[Problem] = []
    errors = DatasetErrors()
    seen: set[str] = set()
    for number, item in read_rows(path):
        if isinstance(item, BadRow):
            errors.lines.append((number, item.reason))
            continue
        has_tests = _present(item.get("tests"))
        required = (fields.problem,) if has_tests else (fields.problem, fields.answer)
        missing = [key for key in required if not _present(item.get(key))]
        if missing:
            errors.lines.append((number, f"missing {' and '.join(repr(m) for m in missing)}"))
            continue
        try:
            task = Task(item.get(fields.task) or (Task.code.value if has_tests else default_task.value))
        except ValueError:
            errors.lines.append((number, f"unknown task {item.get(fields.task)!r}"))
            continue
        # Only a missing id is replaced: 0 and false are ids like any other.
        given = item.get(fields.id)
        pid = f"line{number}" if given is None or str(given).strip() == "" else str(given)
        if pid in seen:
            errors.lines.append((number, f"duplicate id {pid!r}"))
            continue
        tests = None
        if has_tests:
            try:
                tests = parse_tests(item["tests"])
            except ValueError as err:
                errors.lines.append((number, str(err)))
                continue
            if task != Task.code:
                errors.lines.append((number, "'tests' are for task 'code'"))
                continue
        seen.add(pid)
        answer = str(item[fields.answer]) if _present(item.get(fields.answer)) else f"({len(tests or [])} tests)"
        problems.append(Problem(pid, str(item[fields.problem]), answer, task, number, tests))
    return problems, errors


@dataclass
class ProblemOutcome:
    """The result of one problem, with correctness per round."""

    problem: Problem
    result: RSAResult | None = None
    error: str | None = None
    correct_by_round: list[list[bool]] = field(default_factory=list)
    """Per round, per slot: whether its answer is right (a failed rollout or no answer is wrong)."""
    majority_by_round: list[bool] = field(default_factory=list)
    final_correct: bool = False
    verdicts_by_round: list[list[str]] = field(default_factory=list)
    """Code problems with tests: per round, per slot, how its program did (``pass``, ``fail``,
    ``error``, ``timeout``, ``limit``, ``no program``)."""

    def round_metrics(self, round_index: int) -> dict[str, float]:
        """This problem's ``mean_acc`` (share of the population right), ``majority_acc`` (the
        vote's winner right) and ``pass_at_n`` (anyone right) in one round."""
        correct = self.correct_by_round[round_index]
        return {
            "mean_acc": _mean([float(c) for c in correct]),
            "majority_acc": float(self.majority_by_round[round_index]),
            "pass_at_n": float(any(correct)),
        }


METRICS = ("mean_acc", "majority_acc", "pass_at_n")
"""The per-round accuracies of an evaluation, as named in ``results.json``."""


def is_correct(predicted: str | None, gold: str, task: Task) -> bool:
    """Math answers by symbolic equivalence; other tasks by exact (normalised) match."""
    return predicted is not None and answers_equivalent(predicted, gold, task.value)


def score(problem: Problem, result: RSAResult) -> ProblemOutcome:
    """Correctness of every round's population and vote, and of the selected answer."""
    return score_rounds(problem, result.rounds, result.answer, result)


def score_rounds(
    problem: Problem, rounds: list[RoundSummary], answer: str | None, result: RSAResult | None = None
) -> ProblemOutcome:
    """Score a run from its round summaries and selected answer (as a run log holds them)."""
    outcome = ProblemOutcome(problem, result)
    for summary in rounds:
        outcome.correct_by_round.append(
            [is_correct(answer, problem.answer, problem.task) for answer in summary.answers]
        )
        winner = summary.votes[0][0] if summary.votes else None
        outcome.majority_by_round.append(is_correct(winner, problem.answer, problem.task))
    outcome.final_correct = is_correct(answer, problem.answer, problem.task)
    return outcome


async def score_code(problem: Problem, result: RSAResult, sandbox: Sandbox) -> ProblemOutcome:
    """Correctness of a code problem by its tests: a program is right only if every test passes;
    the majority is the most common behaviour on the tests (identical outputs)."""
    assert problem.tests is not None
    outcome = ProblemOutcome(problem, result)
    judge = CodeJudge(sandbox, problem.tests)
    for summary in result.rounds:
        behaviours = await asyncio.gather(*(judge.behaviour(answer) for answer in summary.answers))
        outcome.correct_by_round.append([b.passed for b in behaviours])
        outcome.verdicts_by_round.append([b.verdict for b in behaviours])
        winner = majority_behaviour(behaviours)
        outcome.majority_by_round.append(winner is not None and winner.passed)
    outcome.final_correct = (await judge.behaviour(result.answer)).passed
    return outcome


def run_dir_name(pid: str) -> str:
    """The folder name of a problem's run log under ``OUT/runs/``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", pid)[:100] or "problem"


async def evaluate(
    problems: list[Problem],
    backend: Backend,
    params: RSAParams,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    max_problems_in_flight: int | None = None,
    on_problem_done: Callable[[ProblemOutcome], None] | None = None,
    sandbox: Sandbox | None = None,
) -> list[ProblemOutcome]:
    """Run every problem on one backend, so they share its concurrency budget.

    Code problems with ``tests`` are scored by running their programs in ``sandbox`` (default
    limits when None). ``params.early_stop`` does not stop these runs: every round runs, and :func:`summarise`
    computes what stopping would have given from the per-round numbers of the same runs.

    With ``out_dir`` each problem's run is logged under ``out_dir/runs/ID``; with ``resume`` the
    finished ones are read back and the unfinished ones resumed from their logs.
    """
    limit = max_problems_in_flight or max(2, 256 // max(1, params.n))
    gate = asyncio.Semaphore(limit)
    # Programs of code problems with tests run here: model output executed on this machine.
    sandbox = sandbox or (Sandbox() if any(p.tests for p in problems) else None)
    runs_dir = Path(out_dir) / "runs" if out_dir is not None else None

    async def one(problem: Problem) -> ProblemOutcome:
        async with gate:
            run_params = params.model_copy(update={"task": problem.task, "early_stop": None})
            try:
                result = await _solve_logged(problem, backend, run_params, runs_dir, resume)
            except MarkovRSAError as err:
                outcome = ProblemOutcome(problem, error=str(err))
            else:
                if problem.tests is not None:
                    assert sandbox is not None
                    outcome = await score_code(problem, result, sandbox)
                else:
                    outcome = score(problem, result)
        if on_problem_done is not None:
            on_problem_done(outcome)
        return outcome

    return list(await asyncio.gather(*(one(p) for p in problems)))


async def _solve_logged(
    problem: Problem, backend: Backend, params: RSAParams, runs_dir: Path | None, resume: bool
) -> RSAResult:
    if runs_dir is None:
        return await MarkovRSA(backend, params).solve(problem.problem)
    run_dir = runs_dir / run_dir_name(problem.id)
    if resume and (run_dir / LOG_NAME).is_file():
        logged = read_run_log(run_dir)
        finished = logged_result(logged)
        if finished is not None:
            # A finished run is read back as it was: running it again would only append records.
            return finished
        with RunLog(run_dir, resuming=True) as log:
            return await MarkovRSA(backend, logged.params).solve(
                logged.messages, log, existing=logged.records, seed=logged.seed
            )
    with RunLog(run_dir) as log:
        return await MarkovRSA(backend, params).solve(problem.problem, log)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _with_se(row: dict[str, Any], name: str, stat: MeanSE) -> None:
    row[name] = stat.mean
    row[f"{name}_se"] = round(stat.se, 6)


def summarise(
    outcomes: list[ProblemOutcome],
    params: RSAParams,
    wall_s: float,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``results.json``: per-round accuracy (each with its standard error over problems, ``*_se``)
    and cost, the selected answers' accuracy, and where the numbers came from (``provenance``)."""
    done = [o for o in outcomes if o.result is not None]
    rounds = []
    for r in range(params.t):
        with_round = [o for o in done if len(o.correct_by_round) > r]
        row: dict[str, Any] = {"round": r}
        per_problem = [o.round_metrics(r) for o in with_round]
        for metric in METRICS:
            _with_se(row, metric, mean_se([m[metric] for m in per_problem]))
        row.update(
            problems=len(with_round),
            tokens=sum(o.result.rounds[r].usage.total_tokens for o in with_round if o.result),
            calls=sum(o.result.rounds[r].calls for o in with_round if o.result),
            wall_s=round(_mean([o.result.rounds[r].wall_s for o in with_round if o.result]), 4),
        )
        rounds.append(row)
    summary: dict[str, Any] = {
        "problems": len(outcomes),
        "completed": len(done),
        "errors": len(outcomes) - len(done),
    }
    _with_se(summary, "final_acc", mean_se([float(o.final_correct) for o in done]))
    summary.update(
        tokens=sum(o.result.usage.total_tokens for o in done if o.result),
        calls=sum(o.result.calls for o in done if o.result),
        wall_s=round(wall_s, 3),
        params=params.model_dump(mode="json"),
        rounds=rounds,
    )
    if params.early_stop:
        summary["early_stop"] = early_stop_counterfactual(done, params.early_stop)
    if provenance is not None:
        summary["provenance"] = provenance
    return summary


def early_stop_counterfactual(done: list[ProblemOutcome], threshold: float) -> dict[str, Any]:
    """Accuracy and tokens with ``early_stop`` at ``threshold``, next to the full runs they come from.

    A run stops after the first round (not the last) whose leading answer holds ``threshold`` of
    its answers; its answer is then that round's majority and its tokens those of the rounds up
    to it (plus any final aggregation call, which runs either way).
    """
    stop_rounds: dict[int, int] = {}
    correct_with: list[float] = []
    tokens_with = tokens_without = 0
    for outcome in done:
        assert outcome.result is not None
        rounds = outcome.result.rounds
        total = outcome.result.usage.total_tokens
        outside_rounds = total - sum(r.usage.total_tokens for r in rounds)
        stop = next(
            (r.round for r in rounds[:-1] if early_stop_share(r.votes, threshold) is not None), None
        )
        tokens_without += total
        if stop is None:
            tokens_with += total
            correct_with.append(float(outcome.final_correct))
            continue
        stop_rounds[stop] = stop_rounds.get(stop, 0) + 1
        tokens_with += outside_rounds + sum(r.usage.total_tokens for r in rounds[: stop + 1])
        correct_with.append(float(outcome.majority_by_round[stop]))
    return {
        "threshold": threshold,
        "stopped": sum(stop_rounds.values()),
        "stop_rounds": {str(r): count for r, count in sorted(stop_rounds.items())},
        "final_acc_without": _mean([float(o.final_correct) for o in done]),
        "final_acc_with": _mean(correct_with),
        "tokens_without": tokens_without,
        "tokens_with": tokens_with,
        "tokens_saved_fraction": round(1 - tokens_with / tokens_without, 4) if tokens_without else 0.0,
    }


def backend_kind(backend: Backend) -> tuple[str, str | None]:
    """``(kind, model)`` of a backend, never its address: an evaluation's record names what ran it,
    not where it ran (URLs can hold hosts and credentials)."""
    if backend.name.startswith("local:"):
        return "local", backend.name.removeprefix("local:")
    model = getattr(backend, "model", None)
    return "openai-compatible", str(model) if model else None


def provenance(dataset: str | Path, backend: Backend, params: RSAParams, *, limit: int | None = None) -> dict[str, Any]:
    """What an evaluation ran: package version, date, model, backend kind, seed, the dataset's path
    and SHA-256 (the exact parameters are ``results.json``'s ``params``); enough to compare two
    evaluations later."""
    from . import __version__

    kind, model = backend_kind(backend)
    return {
        "version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "backend": kind,
        "seed": params.seed,
        "dataset": {**identify(dataset), "limit": limit},
    }


def write_outputs(out_dir: str | Path, outcomes: list[ProblemOutcome], summary: dict[str, Any]) -> None:
    """Write ``results.json`` and ``problems.csv`` (one row per problem)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with (out / "problems.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        rounds = summary["params"]["t"]
        writer.writerow(
            ["id", "gold", "predicted", "correct", *[f"round{r}_mean_acc" for r in range(rounds)],
             *[f"round{r}_majority" for r in range(rounds)], "tokens", "calls", "error"]
        )
        for o in outcomes:
            means = [f"{_mean([float(c) for c in cs]):.4f}" for cs in o.correct_by_round]
            majors = [str(int(m)) for m in o.majority_by_round]
            pad = rounds - len(means)
            writer.writerow(
                [o.problem.id, o.problem.answer, o.result.answer if o.result else "", int(o.final_correct),
                 *means, *[""] * pad, *majors, *[""] * pad,
                 o.result.usage.total_tokens if o.result else 0, o.result.calls if o.result else 0, o.error or ""]
            )
