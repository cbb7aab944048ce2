"""What a report shows, read from one run's directory or an evaluation's ``--out`` directory.

Everything is derived from the files the run and the evaluation wrote: ``run.jsonl`` (via the run
log reader), ``results.json`` and ``problems.csv``. Per-problem scores are recomputed with the
evaluation's own scoring functions, so the page and ``results.json`` agree by construction.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._answers import vote
from .._errors import ConfigError
from .._eval import METRICS, Problem, ProblemOutcome, is_correct, run_dir_name, score_rounds
from .._params import Task
from .._prompts import problem_text
from .._result import RolloutRecord, RoundSummary
from .._runlog import LOG_NAME, read_run_log
from .._stats import MeanSE, mean_se

PALETTE_SIZE = 10
"""Distinct answer colours; rarer answers share the 'other' colour."""


@dataclass
class Rollout:
    """One cell of a run's round × slot grid."""

    round: int
    slot: int
    parents: list[int] | None
    answer: str | None = None
    group: int | None = None
    """Index of the answer's group in ``RunReport.groups`` (None: no answer extracted)."""
    correct: bool | None = None
    """Whether the answer is right; None when the right answer is unknown."""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    content: str = ""
    reasoning: str = ""
    tail: str | None = None
    """This trace's tail as its children were shown it (None when no child saw it)."""
    chosen: bool = False
    """Whether this trace is the one the run returned."""
    excluded: str | None = None
    """Why the verifier kept this trace out of the pool and the vote (None: kept)."""
    fitted: str | None = None
    """How the call was fitted to the model's context (None: it fitted as it was)."""

    @property
    def length_capped(self) -> bool:
        """Whether the rollout hit its token budget."""
        return self.finish_reason == "length"

    @property
    def state(self) -> str:
        """``failed`` | ``none`` (no answer) | ``answer``."""
        if self.error is not None:
            return "failed"
        return "answer" if self.answer is not None and self.answer.strip() else "none"


@dataclass
class AnswerGroup:
    """Equivalent answers of a run (one colour on the page), most frequent first."""

    label: str
    count: int
    correct: bool | None
    colour: int
    """Palette index, or -1 for the shared 'other' colour."""


@dataclass
class RunReport:
    """One run: its grid of rollouts, its rounds and how its answer was picked."""

    id: str
    dir: Path
    problem: str
    gold: str | None
    params: dict[str, Any]
    seed: int | None
    tokenizer: str | None
    backend: str
    rounds: list[list[Rollout | None]]
    """Per round, per slot; None for a rollout the log does not hold (an unfinished run)."""
    summaries: list[RoundSummary]
    groups: list[AnswerGroup]
    result: dict[str, Any] | None
    outcome: ProblemOutcome | None
    """Scores per round when the right answer is known and the run finished."""
    skipped_lines: list[int] = field(default_factory=list)
    run_id: str = ""
    model: str | None = None

    @property
    def n(self) -> int:
        """Population size."""
        return int(self.params.get("n") or max((len(r) for r in self.rounds), default=0))

    @property
    def finished(self) -> bool:
        """Whether the run reached its result."""
        return self.result is not None

    @property
    def answer(self) -> str | None:
        """The selected answer."""
        return self.result.get("answer") if self.result else None

    @property
    def final_correct(self) -> bool | None:
        """Whether the selected answer is right (None: unknown or unfinished)."""
        return self.outcome.final_correct if self.outcome else None

    def group_of(self, answer: str | None) -> AnswerGroup | None:
        """The group an answer belongs to."""
        for rollouts in self.rounds:
            for rollout in rollouts:
                if rollout is not None and rollout.answer == answer and rollout.group is not None:
                    return self.groups[rollout.group]
        return None

    def selection_text(self) -> str:
        """How the selected answer was picked, in one or two sentences."""
        if self.result is None:
            return "The run has not finished: no answer was selected."
        method = self.result.get("selection")
        asked = self.params.get("selection")
        answer = self.result.get("answer")
        shown = f"“{answer}”" if answer is not None else "no extractable answer"
        why = ""
        if asked == "auto":
            why = " (auto: at least two answers were extracted)" if method == "majority" else (
                " (auto: fewer than two answers were extracted)" if method == "final_agg" else "")
        if method == "majority":
            votes = self.result.get("votes") or []
            total = sum(int(c) for _, c in votes)
            count = int(votes[0][1]) if votes else 0
            chosen = next((r for r in self.rounds[-1] if r is not None and r.chosen), None) if self.rounds else None
            where = (f" The returned text is round {chosen.round} slot {chosen.slot}"
                     f"{', which finished' if chosen.finish_reason == 'stop' else ''}.") if chosen else ""
            return (f"Majority vote{why} over the final round's extracted answers: {shown} won with "
                    f"{count} of {total} votes (equivalent answers count together).{where}")
        if method == "final_agg":
            return (f"Final aggregation{why}: one more call over {self.params.get('k')} tails of the final round "
                    f"produced {shown}.")
        return f"Sample: the first surviving trace of the final round was returned, with {shown}."


@dataclass
class RoundRow:
    """One round of an evaluation, over the problems that reached it."""

    round: int
    metrics: dict[str, MeanSE]
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    calls: int
    failed: int
    wall_s: float
    """Mean wall time of the round per problem."""
    cumulative_tokens: float
    """Tokens per problem spent up to and including this round."""


@dataclass
class EvalReport:
    """An evaluation: per-round accuracy with standard errors, cost, provenance, and every run."""

    dir: Path
    results: dict[str, Any]
    runs: list[RunReport]
    problems: list[dict[str, str]]
    """Rows of problems.csv (id, gold, predicted, correct, error...)."""
    rows: list[RoundRow]
    final: MeanSE
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    """``(problem id, why)`` of run logs that could not be read; the page goes on without them."""

    @property
    def provenance(self) -> dict[str, Any]:
        """What ran the evaluation (empty for results written before provenance was recorded)."""
        return dict(self.results.get("provenance") or {})

    @property
    def params(self) -> dict[str, Any]:
        """The exact parameters."""
        return dict(self.results.get("params") or {})

    @property
    def name(self) -> str:
        """A short name: the dataset's and the folder's."""
        dataset = (self.provenance.get("dataset") or {}).get("name")
        return f"{dataset} · {self.dir.name}" if dataset else self.dir.name

    @property
    def without_log(self) -> list[str]:
        """Ids of problems with no run log at all (an evaluation run without ``--out`` logs)."""
        known = {r.id for r in self.runs} | {pid for pid, _ in self.unreadable}
        return [row["id"] for row in self.problems if row["id"] not in known]

    def run(self, pid: str) -> RunReport | None:
        """The run of one problem id."""
        return next((r for r in self.runs if r.id == pid), None)

    def per_problem(self, metric: str, round_index: int) -> dict[str, float]:
        """``{problem id: value}`` of one metric in one round, over the problems that reached it;
        ``final_acc`` gives the selected answers' correctness."""
        values = {}
        for run in self.runs:
            o = run.outcome
            if o is None:
                continue
            if metric == "final_acc":
                values[run.id] = float(o.final_correct)
            elif round_index < len(o.correct_by_round):
                values[run.id] = o.round_metrics(round_index)[metric]
        return values


def backend_label(name: str | None) -> str:
    """A backend's kind from its logged name, never its address."""
    if not name:
        return "unknown"
    return "local engine" if name.startswith("local:") else "openai-compatible"


def shorten(text: str, limit: int | None) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and its end (where the answer
    is), with the omission stated."""
    if limit is None or len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    return f"{text[:head]}\n\n[… {len(text) - head - tail:,} characters omitted in this report; the run log has them …]\n\n{text[-tail:]}"


def _records_by_type(path: Path) -> dict[str, list[dict[str, Any]]]:
    """A run log's records grouped by ``type``, in order; unreadable lines are the reader's to
    report, so they are passed over here."""
    found: dict[str, list[dict[str, Any]]] = {}
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                found.setdefault(str(data.get("type")), []).append(data)
    return found


def load_run(run_dir: str | Path, *, gold: str | None = None, pid: str | None = None,
             text_limit: int | None = None) -> RunReport:
    """Read one run log. With ``gold`` the answers are marked right or wrong and the run scored;
    ``text_limit`` shortens each rollout's full text (tails are always whole)."""
    run_dir = Path(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = read_run_log(run_dir)
    by_type = _records_by_type(run_dir / LOG_NAME)
    config = (by_type.get("config") or [{}])[0]
    params = logged.params.model_dump(mode="json")
    task = logged.params.task
    summaries = [RoundSummary.from_dict(d) for d in by_type.get("round_end", [])]
    result = logged.result
    if result is not None and result.get("rounds"):
        summaries = [RoundSummary.from_dict(d) for d in result["rounds"]]

    # Fields the reader does not model (the verifier's verdict, the context fit) come from the raw records.
    raw = {(int(d["round"]), int(d["slot"])): d for d in by_type.get("rollout", []) if "round" in d and "slot" in d}
    # A run that stopped early has fewer rounds than t; an unfinished one shows every planned round.
    planned = len(result["rounds"]) if result is not None and result.get("rounds") else logged.params.t
    rounds: list[list[Rollout | None]] = []
    for round_index in range(planned):
        row: list[Rollout | None] = []
        for slot in range(logged.params.n):
            record = logged.records.get((round_index, slot))
            if record is None:
                row.append(None)
                continue
            trace = record.trace
            row.append(Rollout(
                round=round_index, slot=slot, parents=record.parents, answer=record.answer, error=record.error,
                finish_reason=trace.finish_reason if trace else None,
                prompt_tokens=trace.usage.prompt_tokens if trace else 0,
                completion_tokens=trace.usage.completion_tokens if trace else 0,
                latency_s=trace.latency_s if trace else 0.0,
                attempts=trace.attempts if trace else 1,
                content=shorten(trace.content, text_limit) if trace else "",
                reasoning=shorten(trace.reasoning, text_limit) if trace else "",
                excluded=(raw.get((round_index, slot)) or {}).get("excluded"),
                fitted=(raw.get((round_index, slot)) or {}).get("fitted"),
            ))
        rounds.append(row)
    # A parent's tail is what its children were shown: read it from them.
    for round_index in range(1, len(rounds)):
        for slot in range(len(rounds[round_index])):
            record = logged.records.get((round_index, slot))
            if record is None or not record.parents or not record.shown_tails:
                continue
            for parent, tail in zip(record.parents, record.shown_tails):
                cell = rounds[round_index - 1][parent] if parent < len(rounds[round_index - 1]) else None
                if cell is not None and cell.tail is None:
                    cell.tail = tail

    groups = _group_answers(rounds, gold, task)
    _mark_chosen(rounds, logged.records, result)
    outcome = None
    if gold is not None and result is not None:
        outcome = score_rounds(Problem(pid or run_dir.name, problem_text(logged.messages), gold, task, 0),
                               summaries, result.get("answer"))
    return RunReport(
        id=pid or run_dir.name,
        dir=run_dir,
        problem=problem_text(logged.messages),
        gold=gold,
        params=params,
        seed=logged.seed,
        tokenizer=config.get("tokenizer"),
        backend=backend_label(logged.backend or config.get("backend")),
        rounds=rounds,
        summaries=summaries,
        groups=groups,
        result=result,
        outcome=outcome,
        skipped_lines=logged.skipped_lines,
        run_id=logged.run_id,
        model=logged.model,
    )


def _group_answers(rounds: list[list[Rollout | None]], gold: str | None, task: Task) -> list[AnswerGroup]:
    """Cluster every answer of the run with the vote's own equivalence; one colour per cluster."""
    cells = [c for row in rounds for c in row if c is not None and c.answer is not None]
    tally = vote([c.answer for c in cells], task.value)
    judged: dict[str, bool] = {}

    def right(answer: str) -> bool | None:
        if gold is None:
            return None
        if answer not in judged:
            judged[answer] = is_correct(answer, gold, task)
        return judged[answer]

    groups = []
    for index, ((label, count), members) in enumerate(zip(tally.tally, tally.clusters)):
        groups.append(AnswerGroup(label, count, right(label), index if index < PALETTE_SIZE else -1))
        for member in members:
            cells[member].group = index
            # Each answer is judged on its own, as the evaluation scores it.
            cells[member].correct = right(cells[member].answer or "")
    return groups


def _mark_chosen(rounds: list[list[Rollout | None]], records: dict[tuple[int, int], RolloutRecord],
                 result: dict[str, Any] | None) -> None:
    """Find the returned trace in the final round by its whole text (before any shortening),
    preferring one that finished, as the selection does."""
    if not result or not rounds or result.get("selection") == "final_agg" or not result.get("final_text"):
        return
    last = len(rounds) - 1
    matches = [
        cell for cell in rounds[-1]
        if cell is not None and (trace := records[(last, cell.slot)].trace) is not None
        and (trace.content or trace.text) == result["final_text"]
    ]
    if matches:
        best = next((c for c in matches if c.finish_reason == "stop"), matches[0])
        best.chosen = True


def is_run_dir(path: Path) -> bool:
    """Whether a folder holds one run's log."""
    return (path / LOG_NAME).is_file()


def is_eval_dir(path: Path) -> bool:
    """Whether a folder holds an evaluation's output."""
    return (path / "results.json").is_file()


def load_eval(out_dir: str | Path, *, text_limit: int | None = 20_000) -> EvalReport:
    """Read an evaluation's ``--out`` directory: results, the problems and every run log."""
    out = Path(out_dir)
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {out / 'results.json'}: {err}", param="path") from None
    problems: list[dict[str, str]] = []
    if (out / "problems.csv").is_file():
        with (out / "problems.csv").open(newline="", encoding="utf-8") as handle:
            problems = list(csv.DictReader(handle))
    runs = []
    unreadable = []
    for row in problems:
        run_dir = out / "runs" / run_dir_name(row["id"])
        if is_run_dir(run_dir):
            try:
                runs.append(load_run(run_dir, gold=row.get("gold"), pid=row["id"], text_limit=text_limit))
            except ConfigError as err:
                unreadable.append((row["id"], str(err)))
    t = int((results.get("params") or {}).get("t") or max((len(r.summaries) for r in runs), default=0))
    done = [r for r in runs if r.finished]
    rows = []
    cumulative = 0.0
    for round_index in range(t):
        reached = [r for r in done if len(r.summaries) > round_index]
        scored = [r.outcome.round_metrics(round_index) for r in reached if r.outcome is not None]
        summaries = [r.summaries[round_index] for r in reached]
        tokens = sum(s.usage.total_tokens for s in summaries)
        cumulative += tokens / len(reached) if reached else 0.0
        rows.append(RoundRow(
            round=round_index,
            metrics={m: mean_se([s[m] for s in scored]) for m in METRICS},
            tokens=tokens,
            prompt_tokens=sum(s.usage.prompt_tokens for s in summaries),
            completion_tokens=sum(s.usage.completion_tokens for s in summaries),
            calls=sum(s.calls for s in summaries),
            failed=sum(s.failed for s in summaries),
            wall_s=sum(s.wall_s for s in summaries) / len(summaries) if summaries else 0.0,
            cumulative_tokens=cumulative,
        ))
    final = mean_se([float(r.outcome.final_correct) for r in done if r.outcome is not None])
    return EvalReport(dir=out, results=results, runs=runs, problems=problems, rows=rows, final=final,
                      unreadable=unreadable)
