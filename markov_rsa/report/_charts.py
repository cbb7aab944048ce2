"""Geometry of the report's inline SVG: line charts with error bars and a run's rollout graph.

Only numbers are computed here; the templates turn them into SVG elements, so every string that
reaches the page passes through the template's escaping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._model import RunReport


@dataclass
class Point:
    """A data point in pixels, with its error bar's ends and its label for the tooltip."""

    x: float
    y: float
    low: float
    high: float
    label: str


@dataclass
class Series:
    """One line of a chart."""

    name: str
    css: str
    """Class naming its colour and dash style."""
    points: list[Point]

    @property
    def path(self) -> str:
        """The SVG path through the points."""
        return " ".join(f"{'M' if i == 0 else 'L'}{p.x:.1f},{p.y:.1f}" for i, p in enumerate(self.points))


@dataclass
class Tick:
    """An axis tick: pixel position and label."""

    at: float
    label: str


@dataclass
class LineChart:
    """A chart of accuracies (0..1) against a numeric x, ready to draw."""

    title: str
    x_label: str
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)


@dataclass
class SeriesData:
    """Input of a chart line: x values and (mean, 95 % half-width) pairs."""

    name: str
    css: str
    xs: list[float]
    values: list[tuple[float, float]]


def _nice_step(span: float, count: int) -> float:
    raw = span / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def format_tokens(value: float) -> str:
    """``1.2k``, ``35k``, ``1.5M``."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.0f}"


def line_chart(title: str, x_label: str, data: list[SeriesData], *, integer_x: bool = False,
               width: int = 560, height: int = 300) -> LineChart:
    """Place every series on shared axes: y is accuracy from 0 to 1, x spans the data."""
    chart = LineChart(title, x_label, width, height, left=48, right=16, top=16, bottom=44)
    xs = [x for d in data for x in d.xs]
    if not xs:
        return chart
    low, high = (min(xs), max(xs))
    if integer_x:
        low, high = low - 0.25, high + 0.25
    elif high == low:
        low, high = low * 0.9, high * 1.1 + 1
    else:
        pad = (high - low) * 0.06
        low, high = max(0.0, low - pad), high + pad
    plot_w = width - chart.left - chart.right
    plot_h = height - chart.top - chart.bottom

    def px(x: float) -> float:
        return chart.left + (x - low) / (high - low) * plot_w

    def py(y: float) -> float:
        return chart.top + (1 - min(1.0, max(0.0, y))) * plot_h

    chart.y_ticks = [Tick(py(v / 4), f"{v * 25}%") for v in range(5)]
    if integer_x:
        chart.x_ticks = [Tick(px(v), str(v)) for v in range(math.ceil(low), math.floor(high) + 1)]
    else:
        step = _nice_step(high - low, 5)
        first = math.ceil(low / step) * step
        chart.x_ticks = [Tick(px(first + i * step), format_tokens(first + i * step))
                         for i in range(int((high - first) / step) + 1)]
    for d in data:
        points = [
            Point(px(x), py(mean), py(mean - half), py(mean + half),
                  f"{d.name} · {format_tokens(x) if not integer_x else f'round {int(x)}'}: "
                  f"{mean:.1%} ± {half:.1%}")
            for x, (mean, half) in zip(d.xs, d.values)
        ]
        chart.series.append(Series(d.name, d.css, points))
    return chart


@dataclass
class CellBox:
    """Where one rollout sits in the run graph."""

    round: int
    slot: int
    x: float
    y: float


@dataclass
class Edge:
    """A curve from a parent (previous round) to the child that aggregated it."""

    child: str
    parent: str
    path: str


@dataclass
class RunGraph:
    """Layout of a run's round × slot grid and its parent edges."""

    width: int
    height: int
    cell: int
    label_width: int
    rows: list[float]
    boxes: list[CellBox]
    edges: list[Edge]


def run_graph(run: RunReport, gap: int = 6, row_gap: int = 58, target_width: int = 740) -> RunGraph:
    """Rounds top to bottom, slots left to right; every aggregation linked to its K parents.

    Cells are as large as fits ``target_width`` (28 to 44 px); a wide population scrolls sideways.
    """
    label_width = 64
    n = max([run.n, *(len(r) for r in run.rounds)])
    cell = int(min(44, max(28, (target_width - label_width) / max(1, n) - gap)))
    rows = [12.0 + r * (cell + row_gap) for r in range(len(run.rounds))]
    boxes, edges = [], []
    x_of = [label_width + s * (cell + gap) for s in range(n)]
    for r, rollouts in enumerate(run.rounds):
        for slot in range(len(rollouts)):
            boxes.append(CellBox(r, slot, x_of[slot], rows[r]))
            rollout = rollouts[slot]
            if r == 0 or rollout is None or not rollout.parents:
                continue
            x1, y1 = x_of[slot] + cell / 2, rows[r]
            for parent in rollout.parents:
                x0, y0 = x_of[parent] + cell / 2, rows[r - 1] + cell + 6
                mid = (y0 + y1) / 2
                edges.append(Edge(f"{r}-{slot}", f"{r - 1}-{parent}",
                                  f"M{x0:.1f},{y0:.1f} C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"))
    width = label_width + n * (cell + gap) + 8
    height = (rows[-1] + cell + 16) if rows else 40
    return RunGraph(int(width), int(height), cell, label_width, rows, boxes, edges)


@dataclass
class IntervalBar:
    """A difference drawn as a point with its 95 % interval, on a scale shared by a column of them."""

    width: int
    zero: float
    low: float
    mean: float
    high: float
    positive: bool
    """The interval lies wholly above zero."""
    negative: bool
    """The interval lies wholly below zero."""


def interval_bars(intervals: list[tuple[float, float]], width: int = 180, pad: int = 8) -> list[IntervalBar]:
    """``(mean, half-width)`` pairs placed on one symmetric scale around zero."""
    reach = max([0.05, *(abs(m) + h for m, h in intervals)])
    half = width / 2 - pad

    def px(value: float) -> float:
        return width / 2 + value / reach * half

    return [
        IntervalBar(width, px(0.0), px(m - h), px(m), px(m + h), m - h > 0, m + h < 0)
        for m, h in intervals
    ]
