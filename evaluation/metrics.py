"""Scoring of generated answers and summary statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def string_match(output: str, answers: list[str]) -> float:
    """RULER-style score: the fraction of expected answers found in `output` (case-insensitive)."""
    if not answers:
        raise ValueError("A sample needs at least one expected answer.")
    text = output.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def mean_and_ci(values, z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, z * math.sqrt(variance / n)


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences (press - none) with a 95% bootstrap interval over n pairs."""

    mean: float
    low: float
    high: float
    n: int


def bootstrap_interval(differences, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap of the mean of `differences` (a fixed generator seed: the same input gives the
    same interval). ValueError for no differences."""
    values = np.asarray(list(differences), dtype=float)
    if values.size == 0:
        raise ValueError("No paired samples to build an interval from.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high), int(values.size))
