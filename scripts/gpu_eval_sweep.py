"""The long-context sweep of issue 24 on one GPU, in device calls of at most 10 minutes.

    python3 scripts/gpu_eval_sweep.py --list                          # the plan: stages, estimates, device calls
    OUT_DIR=$OUT python3 scripts/gpu_eval_sweep.py --profile          # one sample's phases on the GPU (first call)
    ADAKV_COMMIT=<sha> OUT_DIR=$OUT python3 scripts/gpu_eval_sweep.py --next   # one device call: continue the sweep
    python3 scripts/gpu_eval_sweep.py --status                        # what the folders hold, what comes next
    python3 scripts/gpu_eval_sweep.py --dry-run                       # each stage as an `adakv-eval run` command
    python3 scripts/gpu_eval_sweep.py --report                        # tables, task filter, recommendation

The sweep: Qwen2.5-Coder-1.5B-Instruct (`adakv-eval build-model qwen2.5-coder-1.5b` first, see docs/RESULTS.md,
"Real instruct models"), query-agnostic, CONTEXT tokens (16384 by default, or 31744 for 32k), ratios 0.5 / 0.75 /
0.875 / 0.9375, 40 samples per task and point, answers decoded with CUDA graphs and fused decode forwards, every
setting of a sample answered in one batched decode (`--batch-answers`, evaluation/engine.py). Three stages, each
one run folder, run in this order:
1. `filter`: the uncompressed model on all eight suite tasks, seed A (folder ..._suite_dense): which tasks it
   solves above chance (`adakv-eval tasks`); only those go on.
2. `A`: seed A (0), the kept tasks, every press of PRESSES at every ratio (folder ..._seed0): the accuracy, memory
   and speed table (costs.csv) and the choice. Its "none" rows are the filter's (same seed, samples and
   config: `runner.copy_rows`, named in its provenance), so they are not computed twice.
3. `B`: seed B (1), the kept tasks, "none" and every press that A's results pick at some ratio
   (`recommend.picks_on_a`), at every ratio (folder ..._seed1): the figures that report A's choice. B never
   influences the choice (`adakv-eval recommend` chooses on A, and refuses a B that lacks one of A's picks), so
   it needs nothing else; no costs are measured on B.
`--next` loads the model once, continues the first unfinished stage (then the next ones) and stops between
samples before CALL_LIMIT_S; each folder resumes where it stopped. Folders live under /tmp/adakv_runs (continued
from evaluation/results/ when committed there) and are copied to OUT_DIR. Without a git checkout (a GPU copy of the
tree) ADAKV_COMMIT must name the commit, so that every folder's provenance says which code measured it.

Estimates (`estimate_s`): per sample, the phases of one sample measured by benchmarks/profile_eval_sample.py on the
GPU when its result is committed (benchmarks/results/profile_eval_sample_<model>_<context>_cuda.json), else
PHASES_S, extrapolated from the committed 8k sweep of the same model on an H200 (docs/RESULTS.md, "Evaluation
speed"); every `--next` prints the seconds per sample it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("MODEL", "qwen2.5-coder-1.5b")
CONTEXT = int(os.environ.get("CONTEXT", "16384"))
# 32k: 31744 context tokens leave room for the question and the answer in Qwen2.5-Coder's 32768 positions
LABELS = {16384: "16k", 31744: "32k"}
RATIOS = (0.5, 0.75, 0.875, 0.9375)
SEEDS = {"A": 0, "B": 1}
SAMPLES = 40
SUITE = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_distractor",
         "variable_tracking", "common_words", "frequent_words")
# the presses; cur / adakv_cur and keydiff / adakv_keydiff: the strongest of the breadth run
PRESSES = ("snapkv", "adakv_snapkv", "pyramidkv", "adakv_pyramidkv", "expected_attention", "streaming_llm",
           "kvzip", "adakv_kvzip", "adakv_model_kvzip", "adakv_model_snapkv", "cur", "adakv_cur", "keydiff",
           "adakv_keydiff")
SCORERS = 7  # scorings per sample of the full grid: SnapKV, PyramidKV, ExpectedAttention, StreamingLLM, KVzip, CUR, KeyDiff
CHECK_NAIVE = 6  # settings per call also answered the naive way (unbatched, press active in the prefill): compared
CALL_LIMIT_S = 540  # a device call runs at most 600 s; the rest is for the copy to OUT_DIR
LOAD_S = 45  # per call: imports, CUDA start, the model's load, kernels' first use
RUNS = Path("/tmp/adakv_runs")
# Seconds of one sample's phases on an H200 (bf16, CUDA graphs, fused decode), from the committed 8k and 4k sweeps
# of the 1.5B model (docs/RESULTS.md, "Evaluation speed": a row's seconds = intercept + slope x forwards, per press):
# generate the sample (0.05 s, measured on CPU at 16k); the dense prefill (0.10 s at 8k, metrics.json, x2.2); the
# uncompressed answer (eager: 0.05 s + 22 ms per forward, about 14 on the suite); KVzip's scoring, once per sample
# (1.0 s at 8k in the sweep, 0.42 s at 4k: x2.4 per doubling, before its scoring moved into flash attention);
# the other scorers once each per sample (at 8k over model-wide KVzip's intercept: SnapKV 0.03 s, PyramidKV 0.08,
# ExpectedAttention 0.11; CUR and KeyDiff not measured: 0.5 s for all six at 16k); each setting's selection and flat
# layers (model-wide KVzip's intercept, 0.094 s at 8k and 0.098 at 4k, less its question prefill, warm-up step and
# capture, three eager forwards of about 22 ms and the graph's instantiation: about 0.02 s, 0.025 at 16k); one
# batched decode per sample (question, warm-up, capture: 0.1 s; then up to max_new_tokens, 26 on average, steps of
# about 6.5 ms at 56 rows: the 3.9 ms graph step of batch 1 plus 6 GiB of kept KV read at about 3.5 TB/s).
PHASES_S = {
    16384: dict(generate=0.05, prefill=0.22, none=0.36, kvzip=1.5, scorers=0.5, setting=0.025, decode=0.3),
    31744: dict(generate=0.10, prefill=0.55, none=0.50, kvzip=3.6, scorers=1.0, setting=0.035, decode=0.5),
}
COST_S = {16384: 1.6, 31744: 3.8}  # costs.csv per setting: two prefills with the press, 2 x 36 decode steps
# B before A has run: "none" and two presses at every ratio, one of them scored by KVzip (the 8k picks were)
B_PRESSES_ASSUMED = ("adakv_model_kvzip", "expected_attention")


@dataclass(frozen=True)
class Stage:
    """One run folder of the sweep."""

    name: str
    folder: str
    seed: int
    presses: tuple[str, ...]
    costs: bool


def folder_name(kind: str) -> str:
    return f"{MODEL}_{LABELS[CONTEXT]}_{kind}_h200"


def _folder(name: str) -> Path:
    """The run folder of `name` under RUNS, continued from evaluation/results/NAME when committed there."""
    local, committed = RUNS / name, ROOT / "evaluation" / "results" / name
    if (committed / "results.csv").is_file() and not local.exists():
        local.mkdir(parents=True)
        for file in ("results.csv", "config.json", "costs.csv", "budgets.csv", "metrics.json"):
            if (committed / file).is_file():
                shutil.copy(committed / file, local / file)
    return local


def _results(name: str):
    import pandas as pd

    path = _folder(name) / "results.csv"
    return pd.read_csv(path, keep_default_na=False) if path.is_file() else pd.DataFrame()


def _import_adakv():
    sys.path.insert(0, str(ROOT))


def kept_tasks() -> list[str]:
    """The suite tasks the filter found solved above chance (ValueError before it finished)."""
    _import_adakv()
    from adakv.evaluation.suite import task_verdicts

    results = _results(folder_name("suite_dense"))
    if results.empty:
        raise ValueError("No filter results yet: run `--next` (the filter is its first stage).")
    verdicts = task_verdicts(results)
    if {v.task for v in verdicts} != set(SUITE) or min(v.n for v in verdicts) < SAMPLES:
        raise ValueError("The filter has not finished (fewer than 40 samples of some task): call `--next` again.")
    kept = [v.task for v in verdicts if v.kept]
    if not kept:
        raise ValueError("The uncompressed model solves no suite task above chance: nothing to sweep.")
    return kept


def rows_expected(stage: Stage, tasks: list[str]) -> int:
    return len(tasks) * SAMPLES * sum(1 if press == "none" else len(RATIOS) for press in stage.presses)


def complete(stage: Stage, tasks: list[str]) -> bool:
    """Whether the stage's folder holds every row (and, where measured, every costs row)."""
    _import_adakv()
    from adakv.evaluation.runner import costs_complete

    results = _results(stage.folder)
    if results.empty:
        return False
    done = len(results.drop_duplicates(["task", "sample", "press", "ratio"]))
    return done >= rows_expected(stage, tasks) and (not stage.costs or costs_complete(sweep_config(stage, tasks),
                                                                                      str(_folder(stage.folder))))


def b_presses() -> tuple[str, ...]:
    """"none" and every press that seed A's results pick at some ratio (ValueError before A finished)."""
    _import_adakv()
    from adakv.evaluation.recommend import picks_on_a

    a = stage_a()
    if not complete(a, kept_tasks()):
        raise ValueError("Seed A has not finished: B's presses are A's picks.")
    picks = picks_on_a(str(_folder(a.folder)))
    return ("none", *sorted({p.press for p in picks}))


def stage_filter() -> Stage:
    return Stage("filter", folder_name("suite_dense"), SEEDS["A"], ("none",), costs=False)


def stage_a() -> Stage:
    return Stage("A", folder_name(f"seed{SEEDS['A']}"), SEEDS["A"], ("none", *PRESSES), costs=True)


def stage_b(presses: tuple[str, ...]) -> Stage:
    return Stage("B", folder_name(f"seed{SEEDS['B']}"), SEEDS["B"], presses, costs=False)


def sweep_config(stage: Stage, tasks: list[str]):
    _import_adakv()
    from adakv.evaluation.runner import SweepConfig

    return SweepConfig(model=MODEL, tasks=list(tasks), context_lengths=[CONTEXT], samples=SAMPLES,
                       presses=list(stage.presses), ratios=list(RATIOS), seed=stage.seed, device="cuda",
                       cuda_graphs=True, fused_decode=True, batch_answers=True, costs=stage.costs,
                       check_naive=0 if stage.name == "filter" else CHECK_NAIVE)


def command(stage: Stage, tasks: list[str]) -> list[str]:
    """The `adakv-eval run` command equivalent to `stage` (what `--next` runs in-process)."""
    config = sweep_config(stage, tasks)
    argv = [sys.executable, "-m", "adakv.evaluation", "run", "--model", MODEL, "--tasks", *tasks,
            "--context-length", str(CONTEXT), "--samples", str(SAMPLES), "--presses", *stage.presses,
            "--ratios", *map(str, RATIOS), "--seed", str(stage.seed), "--device", "cuda", "--cuda-graphs",
            "--fused-decode", "--batch-answers", "--check-naive", str(config.check_naive), "--quiet",
            "--out", str(RUNS / stage.folder)]
    return argv + ([] if stage.costs else ["--no-costs"])


# ----- estimates ---------------------------------------------------------------------------------------------
def phases() -> tuple[dict, str]:
    """(seconds of one sample's phases, where they come from): the committed GPU profile of one sample when there
    is one (benchmarks/profile_eval_sample.py), else PHASES_S."""
    path = ROOT / "benchmarks" / "results" / f"profile_eval_sample_{MODEL}_{CONTEXT}_cuda.json"
    if not path.is_file():
        return dict(PHASES_S[CONTEXT]), "PHASES_S (extrapolated from the 8k H200 sweep)"
    profile = json.loads(path.read_text())
    rows, batched = profile["rows"], profile["batched"]
    kvzip = [row for row in rows if "kvzip" in row["press"]]
    # KVzip's scoring: its first setting's compression minus a later one's (the selection alone)
    scoring = kvzip[0]["batched_compress_s"] - min(row["batched_compress_s"] for row in kvzip[1:]) if len(kvzip) > 1 else 0.0
    per_setting = (batched["compress_s"] - scoring) / len(rows)
    measured = dict(generate=profile["generate_s"], prefill=profile["dense_prefill_s"],
                    none=profile["none"]["compress_s"] + profile["none"]["answer_s"], kvzip=scoring,
                    scorers=0.0, setting=per_setting, decode=batched["decode_s"])  # scorers counted per setting
    return measured, path.relative_to(ROOT).as_posix()


def scorers_of(presses) -> set[str]:
    """The scorer classes (registry specs) of `presses` other than KVzip, whose scoring is counted apart."""
    _import_adakv()
    from adakv.evaluation import registry

    return {registry.PRESSES[p][0] for p in presses if p != "none" and "kvzip" not in p}


def per_sample_s(stage: Stage, phase: dict, copied_none: bool = False) -> float:
    """One sample of `stage`: generate + dense prefill (+ the uncompressed answer unless copied) + KVzip's scoring
    when a KVzip press is in it + each other scorer once + every setting's selection + one batched decode, whose
    steps cost more with more rows (40% of it scaled by the settings, against the 52 of the full grid)."""
    settings = sum(len(RATIOS) for press in stage.presses if press != "none")
    seconds = phase["generate"] + phase["prefill"]
    if "none" in stage.presses and not copied_none:
        seconds += phase["none"]
    if settings:
        full = len(PRESSES) * len(RATIOS)
        seconds += phase["setting"] * settings + phase["decode"] * (0.6 + 0.4 * settings / full)
        seconds += phase["scorers"] * len(scorers_of(stage.presses)) / (SCORERS - 1)
        if any("kvzip" in press for press in stage.presses):
            seconds += phase["kvzip"]
    return seconds


def estimate_s(stage: Stage, tasks: int, phase: dict) -> float:
    """Device seconds of `stage` with `tasks` tasks: its samples and its costs rows (model loads and the naive
    checks are per call: `plan`)."""
    settings = sum(1 if press == "none" else len(RATIOS) for press in stage.presses)
    seconds = tasks * SAMPLES * per_sample_s(stage, phase, copied_none=stage.name == "A")
    if stage.costs:
        seconds += settings * COST_S[CONTEXT]
    return seconds


def plan(tasks: int, b: tuple[str, ...] | None = None) -> tuple[list[tuple[Stage, float]], int, float]:
    """([(stage, seconds)], device calls, total device seconds): every call loads the model once and answers
    CHECK_NAIVE settings the naive way too (a prefill with the press, a third of them KVzip's)."""
    phase, _ = phases()
    stages = [stage_filter(), stage_a(), stage_b(b or ("none", *B_PRESSES_ASSUMED))]
    work = [(stage, estimate_s(stage, len(SUITE) if stage.name == "filter" else tasks, phase)) for stage in stages]
    per_call = LOAD_S + CHECK_NAIVE * (1.5 * phase["prefill"] + phase["none"] + phase["kvzip"] / 3)
    seconds = sum(s for _, s in work)
    calls = math.ceil(seconds / (CALL_LIMIT_S - per_call - 15))  # 15 s: the longest sample, which a call does not start
    return work, calls, seconds + calls * per_call


def listing(tasks: int) -> str:
    phase, source = phases()
    b = None
    try:
        b = b_presses()
    except ValueError:
        pass
    work, calls, total = plan(tasks, b)
    lines = [f"per-sample phases (s) from {source}: " + ", ".join(f"{k} {v:.3f}" for k, v in phase.items())]
    for stage, seconds in work:
        n = len(SUITE) if stage.name == "filter" else tasks
        assumed = " (assumed until A has run)" if stage.name == "B" and b is None else ""
        lines.append(f"{stage.name:6s} {seconds:6.0f} s  seed {stage.seed}  {n} tasks x {SAMPLES} samples  "
                     f"{per_sample_s(stage, phase, stage.name == 'A'):.2f} s/sample  {' '.join(stage.presses)}{assumed}")
    lines.append(f"total about {total / 60:.0f} device minutes in {calls} calls of `--next` (one model load each, "
                 f"{LOAD_S} s, and {CHECK_NAIVE} naive checks) for {tasks} kept tasks at {CONTEXT} tokens")
    return "\n".join(lines)


# ----- running -----------------------------------------------------------------------------------------------
def check_commit() -> None:
    inside = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    if not inside and not os.environ.get("ADAKV_COMMIT", "").strip():
        raise ValueError("No git checkout here: set ADAKV_COMMIT=<the commit this tree is> so provenance names it.")


def next_call(limit_s: float = CALL_LIMIT_S) -> int:
    """Continue the sweep for one device call (see the module docstring)."""
    start = time.monotonic()
    deadline = start + limit_s
    check_commit()
    _import_adakv()
    from adakv.evaluation.runner import copy_rows, load_model, run_sweep

    model, tokenizer = load_model(MODEL, "cuda")
    print(f"model loaded in {time.monotonic() - start:.0f} s", flush=True)
    for name in ("filter", "A", "B"):
        if name == "filter":
            stage, tasks = stage_filter(), list(SUITE)
        else:
            tasks = kept_tasks()
            stage = stage_a() if name == "A" else stage_b(b_presses())
        if complete(stage, tasks):
            continue
        out = _folder(stage.folder)
        config = sweep_config(stage, tasks)
        if name == "A":
            copied = copy_rows(str(_folder(folder_name("suite_dense"))), str(out), config, "none")
            if copied:
                print(f"A: {copied} 'none' rows copied from the filter's folder", flush=True)
        before, began = len(_results(stage.folder)), time.monotonic()
        run_sweep(config, str(out), model=model, tokenizer=tokenizer, progress=False, deadline=deadline)
        added, seconds = len(_results(stage.folder)) - before, time.monotonic() - began
        samples = added / max(1, len(config.settings()) - (1 if name == "A" else 0))
        print(f"{name}: {added} rows in {seconds:.0f} s ({seconds / max(samples, 1):.2f} s per sample, "
              f"{len(_results(stage.folder))} of {rows_expected(stage, tasks)} rows)", flush=True)
        if os.environ.get("OUT_DIR"):
            shutil.copytree(out, Path(os.environ["OUT_DIR"]) / stage.folder, dirs_exist_ok=True)
        if not complete(stage, tasks):
            print("call `--next` again to continue")
            return 0
    print("the sweep is complete: commit the folders and run `--report`")
    return 0


def status() -> str:
    lines = []
    for stage in (stage_filter(), stage_a()):
        tasks = list(SUITE) if stage.name == "filter" else None
        try:
            tasks = tasks or kept_tasks()
        except ValueError as error:
            lines.append(f"{stage.name}: waits ({error})")
            break
        lines.append(f"{stage.name}: {len(_results(stage.folder))} of {rows_expected(stage, tasks)} rows"
                     + (", complete" if complete(stage, tasks) else ""))
    try:
        b = stage_b(b_presses())
        lines.append(f"B: presses {' '.join(b.presses)}; {len(_results(b.folder))} of "
                     f"{rows_expected(b, kept_tasks())} rows")
    except ValueError as error:
        lines.append(f"B: waits ({error})")
    return "\n".join(lines)


def dry_run() -> str:
    lines = [" ".join(command(stage_filter(), list(SUITE)))]
    try:
        tasks = kept_tasks()
    except ValueError:
        tasks = ["<kept tasks>"]
    lines.append(" ".join(command(stage_a(), tasks)))
    try:
        lines.append(" ".join(command(stage_b(b_presses()), tasks)))
    except ValueError:
        lines.append(" ".join(command(stage_b(("none", "<A's picks>")), tasks)))
    return "\n".join(lines)


def profile() -> int:
    """One sample of the sweep's settings, one at a time and batched, on the GPU (benchmarks/profile_eval_sample.py):
    its JSON, committed to benchmarks/results, replaces PHASES_S in the estimates."""
    out = os.environ.get("OUT_DIR") or str(ROOT / "benchmarks" / "results")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_eval_sample.py"), "--model", MODEL,
                           "--context-length", str(CONTEXT), "--device", "cuda", "--cuda-graphs", "--fused-decode",
                           "--presses", *PRESSES, "--ratios", *map(str, RATIOS), "--out", out], cwd=ROOT).returncode


def report() -> int:
    """Reports of the three folders and the recommendation (chosen on seed A, reported on seed B)."""
    base = [sys.executable, "-m", "adakv.evaluation"]
    folders = [ROOT / "evaluation" / "results" / folder_name(kind) for kind in ("suite_dense", "seed0", "seed1")]
    for folder in folders:
        subprocess.run([*base, "report", str(folder)], check=True, stdout=subprocess.DEVNULL)
    out = ROOT / "evaluation" / "results" / folder_name("recommendation")
    return subprocess.run([*base, "recommend", str(folders[1]), str(folders[2]), "--out", str(out)]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the plan with its estimated device seconds")
    parser.add_argument("--tasks-kept", type=int, default=len(SUITE), help="tasks assumed kept, for --list")
    parser.add_argument("--next", action="store_true", help="one device call: continue the sweep")
    parser.add_argument("--limit", type=float, default=CALL_LIMIT_S, help="seconds --next may run")
    parser.add_argument("--status", action="store_true", help="what the folders hold")
    parser.add_argument("--profile", action="store_true", help="one sample's phases on the GPU, for the estimates")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's command, run nothing")
    parser.add_argument("--report", action="store_true", help="reports and recommendation of the committed folders")
    args = parser.parse_args(argv)
    try:
        if CONTEXT not in LABELS:
            raise ValueError(f"CONTEXT must be one of {sorted(LABELS)} (16k, 32k), got {CONTEXT}.")
        if args.list:
            print(listing(args.tasks_kept))
            return 0
        if args.status:
            print(status())
            return 0
        if args.dry_run:
            print(dry_run())
            return 0
        if args.report:
            return report()
        if args.profile:
            return profile()
        if args.next:
            return next_call(args.limit)
        raise ValueError("Give one of --list, --next, --status, --profile, --dry-run, --report.")
    except ValueError as error:
        print(f"gpu_eval_sweep: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
