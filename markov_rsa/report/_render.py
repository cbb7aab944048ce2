"""Turn report models into one self-contained HTML page with Jinja2 templates."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import jinja2

from .. import __version__
from .._errors import ConfigError
from .._eval import METRICS
from ._charts import LineChart, SeriesData, format_tokens, interval_bars, line_chart, run_graph
from ._compare import Comparison, compare
from ._model import EvalReport, RunReport, is_eval_dir, is_run_dir, load_eval, load_run

METRIC_NAMES = {"mean_acc": "mean@N", "majority_acc": "majority", "pass_at_n": "pass@N", "final_acc": "selected"}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("markov_rsa.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * float(v):.1f}%"
    env.filters["tokens"] = format_tokens
    env.filters["thousands"] = lambda v: f"{int(v):,}"
    env.filters["short"] = lambda text, n=6: text if len(text) <= n else text[: n - 1] + "…"
    env.globals["metric_names"] = METRIC_NAMES
    env.globals["metrics"] = METRICS
    env.globals["version"] = __version__
    return env


def cell_data(run: RunReport) -> dict[str, dict[str, Any]]:
    """What the page shows when a rollout is clicked: its fields, keyed ``"round-slot"``."""
    return {
        f"{cell.round}-{cell.slot}": {**asdict(cell), "latency_s": round(cell.latency_s, 3)}
        for rollouts in run.rounds
        for cell in rollouts
        if cell is not None
    }


def _accuracy_charts(reports: list[tuple[str, EvalReport]]) -> tuple[LineChart, LineChart]:
    """Accuracy against round and against cumulative tokens per problem, for one or two evaluations."""
    by_round, by_tokens = [], []
    for tag, report in reports:
        for metric in METRICS:
            values = [(row.metrics[metric].mean, row.metrics[metric].ci95) for row in report.rows]
            name = METRIC_NAMES[metric] + (f" ({tag})" if tag else "")
            css = f"s-{metric}" + (" s-b" if tag == "B" else "")
            by_round.append(SeriesData(name, css, [float(row.round) for row in report.rows], values))
            by_tokens.append(SeriesData(name, css, [row.cumulative_tokens for row in report.rows], values))
    return (
        line_chart("Accuracy by round", "round", by_round, integer_x=True),
        line_chart("Accuracy against tokens spent", "cumulative tokens per problem", by_tokens),
    )


def render_run(run: RunReport) -> str:
    """The page of one run."""
    return _environment().get_template("run_page.html.j2").render(
        run=run, graph=run_graph(run), cells=cell_data(run), anchor="run"
    )


def render_eval(report: EvalReport) -> str:
    """The page of one evaluation, with every problem's run embedded."""
    by_round, by_tokens = _accuracy_charts([("", report)])
    runs = [(f"p{i}", run, run_graph(run), cell_data(run)) for i, run in enumerate(report.runs)]
    return _environment().get_template("eval_page.html.j2").render(
        ev=report, by_round=by_round, by_tokens=by_tokens, runs=runs
    )


def render_comparison(comparison: Comparison) -> str:
    """Two evaluations on one page."""
    by_round, by_tokens = _accuracy_charts([("A", comparison.a), ("B", comparison.b)])
    bars = interval_bars([(d.diff.mean, d.diff.ci95) for d in comparison.differences])
    return _environment().get_template("compare_page.html.j2").render(
        cmp=comparison, by_round=by_round, by_tokens=by_tokens, rows=list(zip(comparison.differences, bars))
    )


def render_path(paths: list[Path], *, text_limit: int | None = 20_000) -> str:
    """The page for an evaluation directory, a run directory, or two evaluation directories."""
    if not 1 <= len(paths) <= 2:
        raise ConfigError("give one evaluation or run directory, or two evaluation directories", param="path")
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"not a directory: {path}", param="path")
        if not (is_eval_dir(path) or is_run_dir(path)):
            raise ConfigError(f"{path} holds neither an evaluation (results.json) nor a run (run.jsonl)", param="path")
    if len(paths) == 2:
        for path in paths:
            if not is_eval_dir(path):
                raise ConfigError(f"comparing needs two evaluation directories; {path} has no results.json", param="path")
        a, b = (load_eval(p, text_limit=text_limit) for p in paths)
        return render_comparison(compare(a, b))
    path = paths[0]
    if is_eval_dir(path):
        return render_eval(load_eval(path, text_limit=text_limit))
    return render_run(load_run(path, gold=_gold_for_run(path), pid=None))


def _gold_for_run(run_dir: Path) -> str | None:
    """The right answer of a run that sits inside an evaluation (``OUT/runs/ID``), when known."""
    import csv

    from .._eval import run_dir_name

    problems = run_dir.parent.parent / "problems.csv"
    if run_dir.parent.name != "runs" or not problems.is_file():
        return None
    with problems.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if run_dir_name(row.get("id", "")) == run_dir.name:
                return row.get("gold")
    return None


def write_report(paths: list[str | Path], output: str | Path | None = None, *, text_limit: int | None = 20_000) -> Path:
    """Render the report of one or two directories to an HTML file; returns its path.

    The default file is ``report.html`` in the (first) directory, ``compare.html`` for two.
    """
    resolved = [Path(p) for p in paths]
    html = render_path(resolved, text_limit=text_limit)
    target = Path(output) if output is not None else resolved[0] / ("compare.html" if len(resolved) == 2 else "report.html")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(html, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write {target}: {err.strerror or err}", param="output") from None
    return target
