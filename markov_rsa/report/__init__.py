"""HTML reports: one self-contained page for an evaluation, a run, or two evaluations side by side.

The page needs no network: styles, script and charts (inline SVG) are all in the file.
"""

from ._compare import Comparison, Difference, compare
from ._model import AnswerGroup, EvalReport, Rollout, RoundRow, RunReport, load_eval, load_run
from ._render import render_comparison, render_eval, render_path, render_run, write_report

__all__ = [
    "AnswerGroup",
    "Comparison",
    "Difference",
    "EvalReport",
    "Rollout",
    "RoundRow",
    "RunReport",
    "compare",
    "load_eval",
    "load_run",
    "render_comparison",
    "render_eval",
    "render_path",
    "render_run",
    "write_report",
]
