"""Scoring of generated answers and summary statistics."""

from __future__ import annotations

import math


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
