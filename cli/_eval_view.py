"""``markov-rsa eval``: progress over problems and the summary table."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from markov_rsa import Backend, ConfigError, RSAParams
from markov_rsa._datasets import Fields
from markov_rsa._loop import run as run_loop
from markov_rsa._eval import ProblemOutcome, evaluate, load_dataset, provenance, summarise, write_outputs


def summary_table(summary: dict[str, Any]) -> Table:
    """Per-round accuracy and cost."""
    table = Table(title=f"{summary['completed']}/{summary['problems']} problems · final accuracy {summary['final_acc']:.3f}")
    for column in ("round", "mean@N", "majority", "pass@N", "tokens", "calls", "wall s"):
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        table.add_row(
            str(row["round"]),
            f"{row['mean_acc']:.3f}",
            f"{row['majority_acc']:.3f}",
            f"{row['pass_at_n']:.3f}",
            str(row["tokens"]),
            str(row["calls"]),
            f"{row['wall_s']:.2f}",
        )
    return table


def early_stop_line(stop: dict[str, Any]) -> str:
    """What ``early_stop`` would have changed, computed from the same (full) runs."""
    return (
        f"early_stop {stop['threshold']:g}: {stop['stopped']} run(s) would stop early; "
        f"final accuracy {stop['final_acc_without']:.3f} -> {stop['final_acc_with']:.3f}, "
        f"tokens {stop['tokens_without']} -> {stop['tokens_with']} "
        f"({stop['tokens_saved_fraction']:.1%} saved)"
    )


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, so an unusable --out fails before the first call
    rather than after the last (raises OSError naming the path)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
        pass


def run_eval(
    dataset: str,
    params: RSAParams,
    backend: Backend,
    *,
    out: Path | None,
    resume: bool,
    limit: int | None,
    quiet: bool,
    check: Callable[[Backend], Awaitable[None]],
    fields: Fields | None = None,
) -> dict[str, Any]:
    """Load, run, report; returns the summary written to results.json."""
    err = Console(stderr=True, soft_wrap=True)
    problems, bad = load_dataset(dataset, params.task, fields)
    for number, why in bad.lines:
        err.print(f"warning: {dataset}:{number}: {why}; skipped", highlight=False)
    if limit is not None:
        problems = problems[: max(0, limit)]
    if not problems:
        raise ConfigError(f"{dataset} has no usable problems")
    if resume and out is not None and not out.is_dir():
        raise ConfigError(f"nothing to resume at {out}", param="resume")
    if not resume and out is not None and (out / "runs").is_dir():
        raise ConfigError(f"{out} already holds an evaluation; continue it with --resume {out} or pick another --out")
    if out is not None:
        check_writable(out)

    bar = Progress(
        TextColumn("problems"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(), console=err, transient=True, disable=quiet or not err.is_terminal,
    )
    task_id = bar.add_task("eval", total=len(problems), acc="")
    right = [0]

    def done(outcome: ProblemOutcome) -> None:
        right[0] += outcome.final_correct
        bar.update(task_id, advance=1, acc=f"correct {right[0]}")
        if outcome.error:
            err.print(f"warning: problem {outcome.problem.id}: {outcome.error}", highlight=False)

    async def go() -> tuple[list[ProblemOutcome], float]:
        try:
            await check(backend)
            started = asyncio.get_running_loop().time()
            outcomes = await evaluate(problems, backend, params, out_dir=out, resume=resume, on_problem_done=done)
            return outcomes, asyncio.get_running_loop().time() - started
        finally:
            await backend.aclose()

    with bar if not bar.disable else contextlib.nullcontext():
        outcomes, wall = run_loop(go())
    summary = summarise(outcomes, params, wall, provenance(dataset, backend, params, limit=limit))
    summary["skipped_lines"] = [{"line": n, "reason": why} for n, why in bad.lines]
    if out is not None:
        write_outputs(out, outcomes, summary)
    Console().print(summary_table(summary))
    if "early_stop" in summary:
        Console().print(early_stop_line(summary["early_stop"]), highlight=False)
    if out is not None:
        err.print(f"wrote {out / 'results.json'} and {out / 'problems.csv'}")
    return summary
