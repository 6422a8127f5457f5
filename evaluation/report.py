"""Tables and plots of a run folder: summary.md / summary.csv / per_task.csv, metrics.json, PNG plots."""

from __future__ import annotations

import json
import os

import pandas as pd

from .metrics import bootstrap_interval, mean_and_ci
from .registry import PRESSES


def _aggregate(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    rows = []
    for keys, group in results.groupby(by, sort=True):
        mean, ci = mean_and_ci(group["score"])
        rows.append({**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))), "score": mean, "ci95": ci,
                     "n": len(group)})
    return pd.DataFrame(rows)


def press_ratio_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean score, 95% CI half-width and row count per (press, ratio), over all tasks and samples."""
    return _aggregate(results, ["press", "ratio"])


def per_task_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (press, ratio) x task, tasks as columns."""
    table = _aggregate(results, ["press", "ratio", "task"])
    return table.pivot_table(index=["press", "ratio"], columns="task", values="score").reset_index()


def adaptive_vs_uniform(results: pd.DataFrame) -> pd.DataFrame:
    """Paired difference adakv_X - X per ratio, on the same (task, length, sample): mean, 95% CI, n.
    X is the same press without the outermost AdaptivePress (of either scope: adakv_model_X is paired with X too)."""
    rows = []
    keys = ["task", "context_length", "sample", "ratio"]
    by_recipe = {recipe: name for name, recipe in PRESSES.items()}
    for name, (scorer, wrappers) in PRESSES.items():
        if not wrappers or not wrappers[-1].startswith("AdaptivePress"):
            continue
        uniform = by_recipe.get((scorer, wrappers[:-1]))
        if name not in set(results.press) or uniform not in set(results.press):
            continue
        paired = results[results.press == name].merge(
            results[results.press == uniform], on=keys, suffixes=("_ada", "_uni")
        )
        for ratio, group in paired.groupby("ratio"):
            mean, ci = mean_and_ci(group["score_ada"] - group["score_uni"])
            rows.append({"adaptive": name, "uniform": uniform, "ratio": ratio, "difference": mean, "ci95": ci,
                         "n": len(group), "adaptive_score": group["score_ada"].mean(),
                         "uniform_score": group["score_uni"].mean()})
    return pd.DataFrame(rows)


FAMILIES: dict[str, tuple[str, ...]] = {
    "retrieval": ("niah_single", "niah_single_number", "niah_multikey", "niah_multivalue", "niah_multiquery",
                  "niah_distractor", "needle_grid"),
    "multi-hop": ("variable_tracking",),
    "aggregation": ("common_words", "frequent_words"),
}
MIB = 2**20


def family_of(task: str) -> str:
    return next((family for family, members in FAMILIES.items() if task in members), "other")


def cost_table(results: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Per (context length, press, ratio): mean score (all tasks, 95% CI, n) joined to costs.csv's KV kept (MiB, and
    as a fraction of the uncompressed cache), KV held (MiB: what the layers allocate, slack and masks included),
    peak memory (MiB; empty off CUDA), prefill s and decode ms/token."""
    scores = _aggregate(results, ["context_length", "press", "ratio"])
    costs = costs.assign(ratio=costs.ratio.astype(float).round(6))
    scores = scores.assign(ratio=scores.ratio.astype(float).round(6))
    table = scores.merge(costs, on=["context_length", "press", "ratio"], how="inner")
    dense = costs[costs.press == "none"].set_index("context_length").kv_kept_bytes
    peak = pd.to_numeric(table.peak_memory_bytes, errors="coerce") / MIB
    return pd.DataFrame({
        "context_length": table.context_length, "press": table.press, "ratio": table.ratio, "score": table.score,
        "ci95": table.ci95, "n": table.n, "kv_kept_mib": table.kv_kept_bytes / MIB, "kv_held_mib": table.kv_bytes / MIB,
        "kv_vs_dense": [b / dense[c] if c in dense.index else float("nan") for b, c in zip(table.kv_kept_bytes, table.context_length)],
        "peak_mib": peak, "prefill_s": table.prefill_s, "decode_ms_per_token": table.decode_ms_per_token,
    }).sort_values(["context_length", "press", "ratio"]).reset_index(drop=True)


def vs_none_table(results: pd.DataFrame) -> pd.DataFrame:
    """Paired difference press - none on the same (task, context length, sample), per (context length, press,
    ratio) over all tasks ("all") and per task: mean, 95% percentile bootstrap interval (low, high), n."""
    keys = ["task", "context_length", "sample"]
    dense = results[results.press == "none"][[*keys, "score"]].rename(columns={"score": "none"})
    paired = results[results.press != "none"].merge(dense, on=keys)
    rows = []
    for (length, press, ratio), group in paired.groupby(["context_length", "press", "ratio"], sort=True):
        for task, part in [("all", group), *group.groupby("task", sort=True)]:
            interval = bootstrap_interval(part.score - part.none)
            rows.append({"context_length": length, "press": press, "ratio": ratio, "task": task,
                         "score": part.score.mean(), "none": part.none.mean(), "difference": interval.mean,
                         "low": interval.low, "high": interval.high, "n": interval.n})
    return pd.DataFrame(rows)


def _markdown(table: pd.DataFrame, digits: int = 3) -> str:
    columns = list(table.columns)
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples(index=False):
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown_and_json(out: str, stem: str, text: str, data: dict) -> tuple[str, str]:
    """`stem`.md (text) and `stem`.json (data) in folder `out`, created if needed; returns their paths."""
    os.makedirs(out, exist_ok=True)
    md, js = os.path.join(out, f"{stem}.md"), os.path.join(out, f"{stem}.json")
    with open(md, "w") as handle:
        handle.write(text)
    with open(js, "w") as handle:
        json.dump(data, handle, indent=2)
    return md, js


def score_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """press x ratio grid of "mean ± ci" strings."""
    labels = [f"{s:.3f} ± {c:.3f}" if c == c else f"{s:.3f}" for s, c in zip(summary.score, summary.ci95)]
    cells = summary.assign(cell=labels)
    grid = cells.pivot(index="press", columns="ratio", values="cell").fillna("")
    grid.columns = [f"ratio {c:g}" for c in grid.columns]
    return grid.reset_index()


REQUIRED_COLUMNS = ("task", "context_length", "sample", "press", "ratio", "score")


def check_run_folder(out: str) -> None:
    """Refuse, with what is wrong, a path that is not a run folder with results (ValueError)."""
    if not os.path.exists(out):
        raise ValueError(f"Run folder {out!r} does not exist; give a folder written by `adakv-eval run --out`.")
    if not os.path.isdir(out):
        raise ValueError(f"{out!r} is a file, not a run folder; give a folder written by `adakv-eval run --out`.")
    path = os.path.join(out, "results.csv")
    if not os.path.isfile(path):
        raise ValueError(f"{out!r} holds no results.csv: not a run folder written by `adakv-eval run --out`, "
                         "or a run that has not finished its first sample yet.")
    try:
        columns = pd.read_csv(path, nrows=0).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ValueError(f"{path} is not a results table ({error}).") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}: not written by `adakv-eval run`.")


def write_reports(out: str, timing: dict | None = None, plots: bool = True) -> dict:
    """Write summary.md, summary.csv, per_task.csv, adaptive_vs_uniform.csv, vs_none.csv, metrics.json and PNGs; with a
    costs.csv also costs_table.csv (`cost_table`) and accuracy_vs_kv.png."""
    check_run_folder(out)
    results = pd.read_csv(os.path.join(out, "results.csv"), keep_default_na=False)
    summary, per_task, paired = press_ratio_table(results), per_task_table(results), adaptive_vs_uniform(results)
    summary.to_csv(os.path.join(out, "summary.csv"), index=False)
    per_task.to_csv(os.path.join(out, "per_task.csv"), index=False)
    paired.to_csv(os.path.join(out, "adaptive_vs_uniform.csv"), index=False)
    metrics_path = os.path.join(out, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as handle:
            metrics = json.load(handle)
    by_task = _aggregate(results, ["press", "ratio", "task"])
    metrics.update(rows=len(results), by_press_ratio=summary.to_dict("records"),
                   adaptive_vs_uniform=paired.to_dict("records"), by_task=by_task.to_dict("records"))
    if timing:
        metrics["fast_path_timing"] = timing
    with open(metrics_path, "w") as handle:
        json.dump(metrics, handle, indent=2, default=str)

    samples = results.groupby(["task", "context_length"])["sample"].nunique()
    text = [f"# Results of {os.path.basename(os.path.abspath(out))}", "",
            f"{len(results)} rows; samples per (task, context length): {samples.min()}-{samples.max()}; "
            "score = fraction of expected answers found in the output; ± is a 95% normal-approximation CI.", "",
            "## Score by press and compression ratio (all tasks)", "", _markdown(score_grid(summary)), "",
            "## Score per task", "", _markdown(per_task)]
    versus = vs_none_table(results)
    versus.to_csv(os.path.join(out, "vs_none.csv"), index=False)
    if not versus.empty:
        overall = versus[versus.task == "all"].drop(columns="task")
        text += ["", "## Paired difference against the uncompressed model (95% bootstrap interval; per task: vs_none.csv)",
                 "", _markdown(overall)]
    if not paired.empty:
        text += ["", "## Adaptive minus uniform (paired on identical samples)", "", _markdown(paired)]
    if "none" in set(results.press):
        from .suite import task_verdicts, verdict_table

        verdicts = verdict_table(task_verdicts(results))
        verdicts.to_csv(os.path.join(out, "tasks_above_chance.csv"), index=False)
        text += ["", "## Tasks the uncompressed model solves above chance (`adakv-eval tasks`)", "",
                 _markdown(verdicts[["task", "context_length", "kept", "reason"]])]
    costs_path = os.path.join(out, "costs.csv")
    costs = pd.read_csv(costs_path) if os.path.exists(costs_path) else pd.DataFrame()
    if not costs.empty:
        table = cost_table(results, costs)
        table.to_csv(os.path.join(out, "costs_table.csv"), index=False)
        text += ["", "## Accuracy, KV held, peak memory and speed per press (costs.csv, same run)", "",
                 f"Costs measured once per setting on sample 0 of {costs.task.iloc[0]} ({costs.device.iloc[0]}); "
                 "peak memory: CUDA only, weights included.", "", _markdown(table)]
    if metrics.get("fast_path_timing", {}).get("speedup"):
        t = metrics["fast_path_timing"]
        text += ["", f"Fast path: speedup {t['speedup']:.2f}x over the naive loop for {t['settings_per_context']} "
                 f"settings per context ({t['settings_checked_both_ways']} settings timed both ways, "
                 f"{len(t['answer_mismatches'])} answer mismatches)."]
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write("\n".join(text) + "\n")
    if plots:
        write_plots(out, results, summary)
        if not costs.empty:
            accuracy_vs_kv_plot(results, costs, out)
    return metrics


def write_plots(out: str, results: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for press, group in summary.groupby("press"):
        if press == "none":
            axis.axhline(group.score.iloc[0], color="black", linestyle="--", label="none (dense)")
            continue
        group = group.sort_values("ratio")
        axis.errorbar(group.ratio, group.score, yerr=group.ci95.fillna(0), marker="o", capsize=3, label=press,
                      linestyle="-" if press.startswith("adakv_") else ":")
    axis.set_xlabel("compression ratio (fraction of KV pairs removed)")
    axis.set_ylabel("score (mean over tasks and samples)")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    written.append(_save(figure, out, "score_vs_ratio.png"))

    grid = results[results.task == "needle_grid"]
    if not grid.empty:
        written.append(_needle_grid_plot(grid, out, plt))
    budgets_path = os.path.join(out, "budgets.csv")
    if os.path.exists(budgets_path):
        written.append(_budgets_plot(pd.read_csv(budgets_path), out, plt))
    return written


def accuracy_vs_kv_plot(results: pd.DataFrame, costs: pd.DataFrame, out: str) -> str:
    """accuracy_vs_kv.png: per task family, mean score against the KV kept (fraction of the uncompressed cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({family_of(task) for task in results.task})
    figure, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 4), squeeze=False)
    for axis, family in zip(axes[0], families):
        part = results[[family_of(task) == family for task in results.task]]
        table = cost_table(part, costs)
        for press, group in table.groupby("press"):
            group = group.sort_values("kv_vs_dense")
            style = dict(marker="*", markersize=12, color="black") if press == "none" else dict(marker="o")
            axis.plot(group.kv_vs_dense, group.score, label=press, linestyle="-" if press.startswith("adakv") else ":", **style)
        axis.set_title(family)
        axis.set_xlabel("KV kept (fraction of the uncompressed cache)")
        axis.set_ylabel("score")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _save(figure, out, "accuracy_vs_kv.png")


def _needle_grid_plot(grid: pd.DataFrame, out: str, plt) -> str:
    settings = list(grid.groupby(["press", "ratio"]).groups)
    columns = min(4, len(settings))
    rows = -(-len(settings) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    figure.subplots_adjust(wspace=0.5, hspace=0.6)
    for axis, (press, ratio) in zip(axes.flat, settings):
        part = grid[(grid.press == press) & (grid.ratio == ratio)]
        table = part.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean")
        image = axis.imshow(table.values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(table.columns)), [str(c) for c in table.columns], fontsize=7)
        axis.set_yticks(range(len(table.index)), [f"{float(d):.2f}" for d in table.index], fontsize=7)
        axis.set_title(f"{press} @ {ratio:g}", fontsize=8)
        axis.set_xlabel("context tokens", fontsize=7)
        axis.set_ylabel("needle depth", fontsize=7)
    for axis in list(axes.flat)[len(settings):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, out, "needle_grid.png")


def _budgets_plot(budgets: pd.DataFrame, out: str, plt) -> str:
    table = budgets.pivot(index="layer", columns="head", values="kept")
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * table.shape[1], 1.5 + 0.2 * table.shape[0]))
    image = axis.imshow(table.values, aspect="auto", cmap="viridis")
    axis.set_xlabel("KV head")
    axis.set_ylabel("layer")
    axis.set_xticks(range(table.shape[1]))
    first = budgets.iloc[0]
    axis.set_title(f"{first.press} @ {first.ratio:g}: tokens kept per head\n"
                   f"({first.task}, {first.context_tokens} context tokens)", fontsize=8)
    figure.colorbar(image, ax=axis)
    return _save(figure, out, "budgets.png")


def _save(figure, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


REPORT_TABLES = ("summary.csv", "per_task.csv", "adaptive_vs_uniform.csv", "vs_none.csv", "costs_table.csv",
                 "tasks_above_chance.csv")
REPORT_INPUTS = ("results.csv", "config.json", "costs.csv", "budgets.csv", "metrics.json")


def _table_difference(name: str, committed: str, regenerated: str) -> str | None:
    if not os.path.exists(regenerated):
        return f"{name}: committed, but the report does not write it from the raw results"
    try:
        a, b = pd.read_csv(committed, keep_default_na=False), pd.read_csv(regenerated, keep_default_na=False)
        pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-9, atol=1e-12)
    except (AssertionError, pd.errors.EmptyDataError) as error:
        return f"{name}: differs from the regenerated table ({str(error).splitlines()[0]})"
    return None


def regenerated_differences(out: str) -> list[str]:
    """How the committed tables of run folder `out` (REPORT_TABLES and summary.md) differ from what
    `write_reports` writes again from its raw results (REPORT_INPUTS), in a scratch copy; [] when they agree."""
    import shutil
    import tempfile

    check_run_folder(out)
    differences = []
    with tempfile.TemporaryDirectory() as parent:
        scratch = os.path.join(parent, os.path.basename(os.path.abspath(out)))  # summary.md names the folder
        os.makedirs(scratch)
        for name in REPORT_INPUTS:
            if os.path.exists(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), scratch)
        write_reports(scratch, plots=False)
        for name in REPORT_TABLES:
            if os.path.exists(os.path.join(out, name)):
                difference = _table_difference(name, os.path.join(out, name), os.path.join(scratch, name))
                differences += [difference] if difference else []
            elif os.path.exists(os.path.join(scratch, name)):
                differences.append(f"{name}: the report writes it, but it is not committed")
        if _read(os.path.join(out, "summary.md")) != _read(os.path.join(scratch, "summary.md")):
            differences.append("summary.md: differs from the regenerated text (run `adakv-eval report` and commit)")
    return differences


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return handle.read()
