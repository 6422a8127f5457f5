"""Two runs of one sweep on the same samples that differ in one setting (e.g. `--kv-dtype float8_e4m3fn`
against the model's dtype): per (press, ratio) and per task, the paired difference of B's score minus A's
on the same samples, with a 95% percentile bootstrap interval.

`compare(run_a, run_b)` refuses two runs whose samples differ (another seed, model, context length, query
mode or task set) and names the settings that differ, which the report states. A difference is "within
noise" when its interval holds 0. Every (press, ratio) both runs hold is compared, "none" included (a
setting that leaves "none" alone, such as kv_dtype, must give exactly 0 there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .metrics import Interval, bootstrap_interval
from .recommend import PAIR_KEYS, _load
from .report import _markdown, write_markdown_and_json

SAME_SAMPLES = ("model", "tasks", "context_lengths", "samples", "seed", "query_aware")
NOT_SETTINGS = ("out", "device")  # where and on what a run ran: not a setting being compared


@dataclass(frozen=True)
class Difference:
    """B minus A for one (press, ratio), over the samples both runs hold (task "all": every task)."""

    press: str
    ratio: float
    task: str
    score_a: float
    score_b: float
    difference: Interval

    @property
    def within_noise(self) -> bool:
        return self.difference.low <= 0 <= self.difference.high


@dataclass(frozen=True)
class Comparison:
    run_a: str
    run_b: str
    settings: dict  # the config keys that differ: key -> [A's value, B's value]
    overall: list[Difference]
    per_task: list[Difference]


def check_same_samples(config_a: dict, config_b: dict) -> dict:
    """The settings in which the two runs differ; ValueError when their samples are not the same."""
    differing = [key for key in SAME_SAMPLES if config_a.get(key) != config_b.get(key)]
    if differing:
        details = "; ".join(f"{k}: {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in differing)
        raise ValueError(f"The two runs do not hold the same samples ({details}): a paired comparison needs them.")
    keys = sorted((set(config_a) | set(config_b)) - set(SAME_SAMPLES) - set(NOT_SETTINGS))
    return {key: [config_a.get(key), config_b.get(key)] for key in keys if config_a.get(key) != config_b.get(key)}


def difference(results_a: pd.DataFrame, results_b: pd.DataFrame, press, ratio, task, resamples) -> Difference | None:
    """B - A on the samples of (press, ratio) both hold; None when they share none."""
    a, b = (r[(r.press == press) & np.isclose(r.ratio.astype(float), ratio)] for r in (results_a, results_b))
    both = a[[*PAIR_KEYS, "score"]].merge(b[[*PAIR_KEYS, "score"]], on=PAIR_KEYS, suffixes=("_a", "_b"))
    if both.empty:
        return None
    interval = bootstrap_interval(both.score_b - both.score_a, resamples)
    return Difference(press, float(ratio), task, float(both.score_a.mean()), float(both.score_b.mean()), interval)


def compare(run_a: str, run_b: str, resamples: int = 2000) -> Comparison:
    """See the module docstring. ValueError for runs that cannot be paired or share no (press, ratio)."""
    (config_a, results_a), (config_b, results_b) = _load(run_a), _load(run_b)
    settings = check_same_samples(config_a, config_b)
    shared = sorted(
        set(results_a[["press", "ratio"]].itertuples(index=False, name=None))
        & set(results_b[["press", "ratio"]].itertuples(index=False, name=None))
    )
    overall = [d for p, r in shared if (d := difference(results_a, results_b, p, r, "all", resamples))]
    if not overall:
        raise ValueError(f"{run_a} and {run_b} share no (press, ratio) on the same samples: nothing to compare.")
    per_task = []
    for task in sorted(set(results_a.task) & set(results_b.task)):
        task_a, task_b = results_a[results_a.task == task], results_b[results_b.task == task]
        per_task += [d for p, r in shared if (d := difference(task_a, task_b, p, r, task, resamples))]
    return Comparison(run_a, run_b, settings, overall, per_task)


def _table(differences: list[Difference]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "task": d.task, "press": d.press, "ratio": d.ratio, "A": d.score_a, "B": d.score_b,
                "B - A [95%]": f"{d.difference.mean:+.3f} [{d.difference.low:+.3f}, {d.difference.high:+.3f}]",
                "n": d.difference.n, "within noise": "yes" if d.within_noise else "no",
            }  # fmt: skip
            for d in differences
        ]
    )


def markdown(comparison: Comparison) -> str:
    settings = "; ".join(f"{k}: {a!r} (A) vs {b!r} (B)" for k, (a, b) in comparison.settings.items()) or "none"
    outside = [d for d in comparison.overall if not d.within_noise]
    lines = [
        f"# {comparison.run_b} (B) against {comparison.run_a} (A), on the same samples", "",
        f"Settings that differ: {settings}. Paired differences B - A per sample with 95% percentile bootstrap "
        "intervals; within noise: the interval holds 0.", "",
        f"**{len(comparison.overall) - len(outside)} of {len(comparison.overall)} (press, ratio) points within noise**"
        + ("." if not outside else ": outside, " + ", ".join(f"{d.press} at {d.ratio:g}" for d in outside) + "."),
        "", "## Every task together", "", _markdown(_table(comparison.overall)),
        "", "## Per task", "", _markdown(_table(comparison.per_task)),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_comparison(comparison: Comparison, out: str) -> tuple[str, str]:
    """comparison.md and comparison.json in folder `out`; returns their paths."""
    return write_markdown_and_json(out, "comparison", markdown(comparison), asdict(comparison))
