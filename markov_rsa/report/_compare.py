"""Two evaluations side by side: paired differences over the problems both ran."""

from __future__ import annotations

from dataclasses import dataclass

from .._eval import METRICS
from .._stats import MeanSE, paired_difference
from ._model import EvalReport


@dataclass
class Difference:
    """``B - A`` of one metric in one round (or of the selected answers) over the shared problems."""

    metric: str
    round: int | None
    a: float
    b: float
    diff: MeanSE


@dataclass
class Comparison:
    """What the comparison page shows."""

    a: EvalReport
    b: EvalReport
    shared: list[str]
    """Problem ids both evaluations finished."""
    differences: list[Difference]
    both_right: int
    only_a: int
    only_b: int
    neither: int
    param_rows: list[tuple[str, object, object]]
    """``(name, value in A, value in B)`` of every parameter and provenance field."""


def _paired(a: dict[str, float], b: dict[str, float], ids: list[str]) -> tuple[float, float, MeanSE]:
    xs = [a[i] for i in ids]
    ys = [b[i] for i in ids]
    n = len(ids) or 1
    return sum(xs) / n, sum(ys) / n, paired_difference(xs, ys)


def compare(a: EvalReport, b: EvalReport) -> Comparison:
    """Pair the problems by id; every difference is B minus A with its standard error."""
    final_a, final_b = a.per_problem("final_acc", 0), b.per_problem("final_acc", 0)
    shared = [pid for pid in final_a if pid in final_b]
    differences = []
    mean_a, mean_b, diff = _paired(final_a, final_b, shared)
    differences.append(Difference("final_acc", None, mean_a, mean_b, diff))
    for round_index in range(min(len(a.rows), len(b.rows))):
        for metric in METRICS:
            va, vb = a.per_problem(metric, round_index), b.per_problem(metric, round_index)
            ids = [pid for pid in shared if pid in va and pid in vb]
            mean_a, mean_b, diff = _paired(va, vb, ids)
            differences.append(Difference(metric, round_index, mean_a, mean_b, diff))
    both = sum(1 for i in shared if final_a[i] and final_b[i])
    only_a = sum(1 for i in shared if final_a[i] and not final_b[i])
    only_b = sum(1 for i in shared if final_b[i] and not final_a[i])
    rows: list[tuple[str, object, object]] = []
    for key in sorted(set(a.params) | set(b.params)):
        rows.append((key, a.params.get(key), b.params.get(key)))
    for key in ("model", "backend", "version", "date"):
        rows.append((key, a.provenance.get(key), b.provenance.get(key)))
    rows.append(("dataset sha256", (a.provenance.get("dataset") or {}).get("sha256"),
                 (b.provenance.get("dataset") or {}).get("sha256")))
    return Comparison(a, b, shared, differences, both, only_a, only_b, len(shared) - both - only_a - only_b, rows)
