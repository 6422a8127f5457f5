"""Choose a configuration on one seed of samples, report it on another: no best-of-N on the same samples.

`recommend(run_a, run_b)` reads two run folders of the same sweep (same model, context lengths, tasks
and query mode) whose samples were drawn with different seeds. On run A only it
1. keeps the tasks the uncompressed model solves above chance (`suite.task_verdicts`),
2. picks, at every ratio, the press with the highest mean score over every (press, ratio) A holds (ties: the
   smaller mean drop, then the name),
3. recommends the highest ratio whose pick loses at most `max_drop` against "none" on A (mean paired
   difference), or the pick at the lowest ratio when none qualifies (flagged).
Run B then gives the reported figures: for every pick, the paired difference against "none" on B's
samples (same task, context length and sample index) with a 95% percentile bootstrap interval, over all
kept tasks and per task. Run B's results never influence the choice, so B needs only "none" and A's picks
(`picks_on_a`: what scripts/gpu_eval_sweep.py runs on seed B); a pick B lacks is refused by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from . import suite
from .metrics import Interval, bootstrap_interval
from .registry import NO_PRESS
from .report import _markdown, check_run_folder, write_markdown_and_json

PAIR_KEYS = ["task", "context_length", "sample"]
SAME_SWEEP = ("model", "context_lengths", "query_aware", "backend", "dtype")


@dataclass(frozen=True)
class Point:
    """One (press, ratio): its mean score and its paired difference against "none", on one run."""

    press: str
    ratio: float
    score: float
    dense_score: float
    difference: Interval


@dataclass(frozen=True)
class Recommendation:
    """The choice made on run A and the figures of run B (see the module docstring)."""

    run_a: str
    run_b: str
    seed_a: int
    seed_b: int
    max_drop: float
    chosen: Point  # as measured on A
    confirmed: Point  # the same (press, ratio) on B
    within_max_drop_on_a: bool
    picks_a: list[Point]
    picks_b: list[Point]
    per_task_b: list[dict]
    tasks_left_out: list[dict]


def paired(results: pd.DataFrame, press: str, ratio: float) -> pd.DataFrame:
    """Rows of (press, ratio) joined to the "none" rows of the same samples: columns score, dense."""
    rows = results[(results.press == press) & np.isclose(results.ratio.astype(float), ratio)]
    dense = results[results.press == NO_PRESS][[*PAIR_KEYS, "score"]].rename(columns={"score": "dense"})
    return rows[[*PAIR_KEYS, "score"]].merge(dense, on=PAIR_KEYS)


def point(results: pd.DataFrame, press: str, ratio: float, resamples: int = 2000) -> Point:
    both = paired(results, press, ratio)
    if both.empty:
        raise ValueError(f"No samples of {press} at ratio {ratio:g} paired with press 'none'.")
    difference = bootstrap_interval(both.score - both.dense, resamples)
    return Point(press, float(ratio), float(both.score.mean()), float(both.dense.mean()), difference)


def _load(run: str) -> tuple[dict, pd.DataFrame]:
    check_run_folder(run)
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run!r} holds no config.json: its seed is unknown.")
    with open(path) as handle:
        config = json.load(handle)
    results = pd.read_csv(os.path.join(run, "results.csv"), keep_default_na=False)
    return config, results


def check_pair(config_a: dict, config_b: dict) -> None:
    """Refuse two runs that are not the same sweep on different samples."""
    differing = [key for key in SAME_SWEEP if config_a.get(key) != config_b.get(key)]
    if differing:
        details = "; ".join(f"{k}: {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in differing)
        raise ValueError(f"The two runs are not the same sweep ({details}).")
    if config_a.get("seed") == config_b.get("seed"):
        raise ValueError(f"Both runs use sample seed {config_a.get('seed')}: choosing and reporting on the same "
                         "samples is best-of-N; run the second with another --seed.")


def candidates(results: pd.DataFrame) -> list[tuple[str, float]]:
    settings = results[results.press != NO_PRESS][["press", "ratio"]].drop_duplicates()
    return sorted((p, float(r)) for p, r in settings.itertuples(index=False))


def picks_per_ratio(results: pd.DataFrame, settings: list[tuple[str, float]], resamples: int) -> list[Point]:
    """At every ratio the (press, ratio) of the highest mean score on `results`."""
    points = [point(results, press, ratio, resamples) for press, ratio in settings]
    best: dict[float, Point] = {}
    for p in points:
        current = best.get(p.ratio)
        if current is None or (-p.score, -p.difference.mean, p.press) < (-current.score, -current.difference.mean, current.press):
            best[p.ratio] = p
    return [best[ratio] for ratio in sorted(best)]


def choose(picks: list[Point], max_drop: float) -> tuple[Point, bool]:
    """The pick at the highest ratio losing at most `max_drop`; else the lowest ratio's (False)."""
    within = [p for p in picks if p.difference.mean >= -max_drop]
    return (within[-1], True) if within else (picks[0], False)


def per_task(results: pd.DataFrame, press: str, ratio: float, resamples: int) -> list[dict]:
    rows = []
    for task, group in results.groupby("task"):
        p = point(group, press, ratio, resamples)
        rows.append({"task": task, "none": p.dense_score, press: p.score, "difference": p.difference.mean,
                     "low": p.difference.low, "high": p.difference.high, "n": p.difference.n})
    return rows


def _kept_on_a(run_a: str, results_a: pd.DataFrame) -> tuple[list, pd.DataFrame]:
    verdicts = suite.task_verdicts(results_a)
    kept_a = suite.kept_rows(results_a, verdicts)
    if kept_a.empty:
        raise ValueError(f"No task of {run_a} is solved above chance by the uncompressed model: nothing to compare.")
    if not candidates(kept_a):
        raise ValueError(f"{run_a} holds no (press, ratio) besides 'none' on the kept tasks: nothing to choose from.")
    return verdicts, kept_a


def picks_on_a(run_a: str, resamples: int = 2000) -> list[Point]:
    """The best (press, ratio) at every ratio of run A, on A's kept tasks (steps 1-2 of the module docstring):
    what run B must hold besides "none" for `recommend` to report the choice."""
    _, results_a = _load(run_a)
    _, kept_a = _kept_on_a(run_a, results_a)
    return picks_per_ratio(kept_a, candidates(kept_a), resamples)


def recommend(run_a: str, run_b: str, max_drop: float = 0.05, resamples: int = 2000) -> Recommendation:
    """See the module docstring. ValueError for folders that cannot be compared."""
    if not 0 <= max_drop <= 1:
        raise ValueError(f"max_drop must be in [0, 1], got {max_drop}.")
    (config_a, results_a), (config_b, results_b) = _load(run_a), _load(run_b)
    check_pair(config_a, config_b)
    verdicts, kept_a = _kept_on_a(run_a, results_a)
    kept_b = suite.kept_rows(results_b, verdicts)
    picks_a = picks_per_ratio(kept_a, candidates(kept_a), resamples)
    missing = [(p.press, p.ratio) for p in picks_a if (p.press, p.ratio) not in set(candidates(kept_b))]
    if missing:
        names = ", ".join(f"{press} at {ratio:g}" for press, ratio in missing)
        raise ValueError(f"{run_b} lacks A's pick(s) {names} on the kept tasks: run them on B's samples to report them.")
    chosen, within = choose(picks_a, max_drop)
    picks_b = [point(kept_b, p.press, p.ratio, resamples) for p in picks_a]
    confirmed = next(p for p in picks_b if (p.press, p.ratio) == (chosen.press, chosen.ratio))
    left_out = [asdict(v) for v in verdicts if not v.kept]
    return Recommendation(run_a, run_b, config_a["seed"], config_b["seed"], max_drop, chosen, confirmed, within,
                          picks_a, picks_b, per_task(kept_b, chosen.press, chosen.ratio, resamples), left_out)


def _interval(p: Point) -> str:
    d = p.difference
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def markdown(rec: Recommendation) -> str:
    """The recommendation as a markdown section."""
    c, b = rec.chosen, rec.confirmed
    picks = pd.DataFrame([{"ratio": a.ratio, "press (chosen on A)": a.press, "score A": a.score,
                           "vs none A [95%]": _interval(a), "score B": pb.score, "vs none B [95%]": _interval(pb),
                           "n B": pb.difference.n} for a, pb in zip(rec.picks_a, rec.picks_b)])
    tasks = pd.DataFrame(rec.per_task_b)
    lines = [f"# Recommendation: chosen on seed {rec.seed_a}, reported on seed {rec.seed_b}", "",
             f"Chosen on A ({rec.run_a}): **{c.press} at ratio {c.ratio:g}**, the highest ratio whose best press "
             f"loses at most {rec.max_drop:g} against the uncompressed model on A"
             + ("" if rec.within_max_drop_on_a else " (none did: the best press at the lowest ratio)") + ".", "",
             f"On B ({rec.run_b}): score {b.score:.3f} vs {b.dense_score:.3f} uncompressed; paired difference "
             f"{_interval(b)} (95% bootstrap interval, n = {b.difference.n}).", "",
             "## Best press per ratio (picked on A, measured on B)", "", _markdown(picks), "",
             f"## {c.press} at {c.ratio:g} per task, on B", "", _markdown(tasks)]
    if rec.tasks_left_out:
        left = pd.DataFrame(rec.tasks_left_out)[["task", "context_length", "reason"]]
        lines += ["", "## Tasks left out (not solved above chance uncompressed, on A)", "", _markdown(left)]
    return "\n".join(lines) + "\n"


def write_recommendation(rec: Recommendation, out: str) -> tuple[str, str]:
    """recommendation.md and recommendation.json in folder `out`; returns their paths."""
    return write_markdown_and_json(out, "recommendation", markdown(rec), asdict(rec))
