"""Which tasks a sweep's comparison may stand on: those the uncompressed model solves above chance.

A task the dense model fails says nothing about a press (every press "keeps" a score of zero). The
filter reads the rows of press "none" and keeps a (task, context length) when the lower end of the
95% interval of the dense score lies above the task's chance level; the others are reported with the
reason they are left out.

Chance level: the expected score of a guesser that does not read the context and names as many
candidates as there are answers, drawn from the vocabulary the answers come from (the score is the
fraction of expected answers found, with no penalty for extra words):
- needle tasks with word values: k answers out of the 50 `NEEDLE_VALUES` -> k / 50;
- numeric needles, variable names (5 random capitals), made-up Zipf words, essay words: a vocabulary of
  hundreds to millions of candidates -> taken as 0.01 (an upper bound), so that a dense score
  indistinguishable from zero is still left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from . import tasks
from .metrics import mean_and_ci
from .registry import NO_PRESS

WORD_POOL = len(tasks.NEEDLE_VALUES)
CHANCE: dict[str, float] = {
    "niah_single": 1 / WORD_POOL,
    "niah_single_number": 0.01,
    "niah_multikey": 1 / WORD_POOL,
    "niah_multivalue": 4 / WORD_POOL,
    "niah_multiquery": 4 / WORD_POOL,
    "niah_distractor": 1 / WORD_POOL,
    "needle_grid": 1 / WORD_POOL,
    "variable_tracking": 0.01,
    "common_words": 0.01,
    "frequent_words": 0.01,
}


@dataclass(frozen=True)
class TaskVerdict:
    """Whether (task, context_length) is kept, with the dense score behind the decision."""

    task: str
    context_length: int
    kept: bool
    dense_score: float
    ci95: float
    n: int
    chance: float
    reason: str


def chance_level(task: str) -> float:
    """The chance level of `task` (see the module docstring); ValueError for an unknown task."""
    tasks.check_task_names([task])
    return CHANCE[task]


def _verdict(task: str, length: int, scores: pd.Series) -> TaskVerdict:
    mean, ci = mean_and_ci(scores)
    chance = chance_level(task)
    low = mean - (0.0 if ci != ci else ci)  # one sample: no interval, the mean itself
    kept = len(scores) >= 2 and low > chance
    if kept:
        reason = f"dense {mean:.3f} ± {ci:.3f} is above chance {chance:.3f}"
    elif len(scores) < 2:
        reason = f"only {len(scores)} dense sample: no interval"
    else:
        reason = f"dense {mean:.3f} ± {ci:.3f} does not clear chance {chance:.3f} (lower bound {low:.3f})"
    return TaskVerdict(task, int(length), kept, float(mean), float(ci), len(scores), chance, reason)


def task_verdicts(results: pd.DataFrame) -> list[TaskVerdict]:
    """One verdict per (task, context length) of `results`, from its press-"none" rows. ValueError when
    there are none (a sweep without the uncompressed model cannot be filtered)."""
    dense = results[results.press == NO_PRESS] if not results.empty else results
    if dense.empty:
        raise ValueError("The results hold no rows of press 'none': the task filter needs the uncompressed model.")
    return [_verdict(task, length, group["score"]) for (task, length), group in dense.groupby(["task", "context_length"])]


def kept_rows(results: pd.DataFrame, verdicts: list[TaskVerdict]) -> pd.DataFrame:
    """The rows of `results` whose (task, context length) was kept."""
    kept = {(v.task, v.context_length) for v in verdicts if v.kept}
    mask = [(task, int(length)) in kept for task, length in zip(results.task, results.context_length)]
    return results[mask]


def verdict_table(verdicts: list[TaskVerdict]) -> pd.DataFrame:
    return pd.DataFrame([asdict(v) for v in verdicts])
