"""Means with standard errors over problems, and paired differences between two evaluations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964
"""Two-sided 95 % quantile of the normal distribution: a 95 % interval is mean ± Z95·SE."""


@dataclass(frozen=True)
class MeanSE:
    """A mean over ``n`` problems and its standard error (sample standard deviation / √n)."""

    mean: float
    se: float
    n: int

    @property
    def ci95(self) -> float:
        """Half-width of the normal-approximation 95 % interval."""
        return Z95 * self.se


def mean_se(values: Sequence[float]) -> MeanSE:
    """Mean and standard error of the mean; the error is 0 with fewer than two values."""
    n = len(values)
    if n == 0:
        return MeanSE(0.0, 0.0, 0)
    mean = sum(values) / n
    if n < 2:
        return MeanSE(mean, 0.0, n)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return MeanSE(mean, math.sqrt(variance / n), n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> MeanSE:
    """Mean of ``b - a`` over paired problems and its standard error (the pairing removes the
    between-problem variance, so the interval is narrower than that of two independent means)."""
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    return mean_se([y - x for x, y in zip(a, b)])
