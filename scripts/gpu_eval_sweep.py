"""The long-context sweep of issue 24 on one GPU, in slices that each fit one 10-minute device call.

    python3 scripts/gpu_eval_sweep.py --list                      # every slice, in order, with its estimate
    ADAKV_COMMIT=<sha> OUT_DIR=$OUT python3 scripts/gpu_eval_sweep.py --slice filter-1
    python3 scripts/gpu_eval_sweep.py --slice A-g1-1 --dry-run    # the exact command, nothing run
    python3 scripts/gpu_eval_sweep.py --report                    # tables, task filter, recommendation

The sweep: Qwen2.5-Coder-1.5B-Instruct (`adakv-eval build-model qwen2.5-coder-1.5b` first, see docs/RESULTS.md,
"Real instruct models"), query-agnostic, CONTEXT tokens (16384 by default, or 31744 for 32k), ratios 0.5 / 0.75 / 0.875 / 0.9375,
40 samples per task, answers decoded with CUDA graphs and fused decode forwards. Slices, in order:
- `filter-{c}`: the uncompressed model on all eight suite tasks, seed 0 (folder ..._suite_dense): which tasks it
  solves above chance (`adakv-eval tasks`); only those go into the sweep;
- `{A,B}-g{k}-{c}`: seed A (0) or B (1), press group k (`GROUPS`, with "none"), samples up to c x CHUNKS
  (10 per slice at 16k, 4 at 32k).
  Seed A's folder chooses the configuration, seed B's reports it (`adakv-eval recommend`).
Each slice is one `adakv-eval run` into a folder under /tmp/adakv_runs (continued from evaluation/results/ when
committed there), stopped at SLICE_LIMIT_S; a slice stopped early resumes when called again. The folder is copied
to OUT_DIR. Without a git checkout (a GPU copy of the tree) ADAKV_COMMIT must name the commit, so that every
folder's provenance says which code measured it.
"""

from __future__ import annotations

import argparse
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
RATIOS = ("0.5", "0.75", "0.875", "0.9375")
SEEDS = {"A": 0, "B": 1}
SAMPLES = 40
CHUNKS = {16384: 10, 31744: 4}  # samples per task that one slice adds
FILTER_CHUNKS = {16384: 40, 31744: 20}
SUITE = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_distractor",
         "variable_tracking", "common_words", "frequent_words")
GROUPS = (  # the presses, two per slice; cur / adakv_cur and keydiff / adakv_keydiff: strongest of the breadth run
    ("snapkv", "adakv_snapkv"), ("pyramidkv", "adakv_pyramidkv"), ("expected_attention", "streaming_llm"),
    ("kvzip", "adakv_kvzip"), ("adakv_model_kvzip", "adakv_model_snapkv"), ("cur", "adakv_cur"),
    ("keydiff", "adakv_keydiff"),
)
SLICE_LIMIT_S = 540
RUNS = Path("/tmp/adakv_runs")
# Estimates, extrapolated from the committed 8k sweep of the same model on an H200 (0.23 s per row with nine presses,
# docs/RESULTS.md): seconds per answered row and per dense prefill; KVzip's extra scoring prefill per sample; the
# costs step per setting (two prefills and 2 x 32 decode steps); the model load. The first slice's printed
# seconds per row replace them.
ROW_S = {16384: 0.30, 31744: 0.65}
PREFILL_S = {16384: 0.6, 31744: 1.6}
KVZIP_S = {16384: 1.5, 31744: 4.0}
COST_S = {16384: 1.6, 31744: 3.8}
LOAD_S = 45


@dataclass(frozen=True)
class Slice:
    """One device call: `samples` samples (cumulative) of `presses` into folder `folder` with sample seed `seed`."""

    name: str
    folder: str
    seed: int
    presses: tuple[str, ...]
    samples: int
    new_samples: int  # samples this slice adds per task


def folder_name(kind: str) -> str:
    return f"{MODEL}_{LABELS[CONTEXT]}_{kind}_h200"


def slices() -> list[Slice]:
    """Every slice of the sweep, in the order to run them."""
    step = FILTER_CHUNKS[CONTEXT]
    order = [Slice(f"filter-{c}", folder_name("suite_dense"), SEEDS["A"], ("none",), step * c, step)
             for c in range(1, SAMPLES // step + 1)]
    for seed_name, seed in SEEDS.items():
        for k, group in enumerate(GROUPS, 1):
            chunk = CHUNKS[CONTEXT]
            for c in range(1, SAMPLES // chunk + 1):
                order.append(Slice(f"{seed_name}-g{k}-{c}", folder_name(f"seed{seed}"), seed, ("none", *group),
                                   chunk * c, chunk))
    return order


def estimate_s(piece: Slice, tasks: int) -> float:
    """Estimated device seconds of `piece` with `tasks` tasks (see the constants)."""
    settings = sum(1 if press == "none" else len(RATIOS) for press in piece.presses)
    samples = tasks * piece.new_samples
    kvzip = any("kvzip" in press for press in piece.presses)
    per_sample = PREFILL_S[CONTEXT] + settings * ROW_S[CONTEXT] + (KVZIP_S[CONTEXT] if kvzip else 0.0)
    return LOAD_S + samples * per_sample + settings * COST_S[CONTEXT]


def _folder(name: str) -> Path:
    """The run folder of `name` under RUNS, continued from evaluation/results/NAME when committed there."""
    local, committed = RUNS / name, ROOT / "evaluation" / "results" / name
    if (committed / "results.csv").is_file() and not local.exists():
        local.mkdir(parents=True)
        for file in ("results.csv", "config.json", "costs.csv", "budgets.csv", "metrics.json"):
            if (committed / file).is_file():
                shutil.copy(committed / file, local / file)
    return local


def kept_tasks() -> list[str]:
    """The suite tasks the filter slice found solved above chance (ValueError before it ran)."""
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from adakv.evaluation.suite import task_verdicts

    path = _folder(folder_name("suite_dense")) / "results.csv"
    if not path.is_file():
        raise ValueError(f"No filter results ({path}): run the filter slices (`--slice filter-1`, ...) first.")
    verdicts = task_verdicts(pd.read_csv(path, keep_default_na=False))
    if {v.task for v in verdicts} != set(SUITE) or min(v.n for v in verdicts) < SAMPLES:
        raise ValueError("The filter slices have not finished (fewer than 40 samples of some task): call them again.")
    kept = [v.task for v in verdicts if v.kept]
    if not kept:
        raise ValueError("The uncompressed model solves no suite task above chance: nothing to sweep.")
    return kept


def command(piece: Slice, tasks: list[str]) -> list[str]:
    return [sys.executable, "-m", "adakv.evaluation", "run", "--model", MODEL, "--tasks", *tasks,
            "--context-length", str(CONTEXT), "--samples", str(piece.samples), "--presses", *piece.presses,
            "--ratios", *RATIOS, "--seed", str(piece.seed), "--device", "cuda", "--cuda-graphs", "--fused-decode",
            "--check-naive", "0", "--quiet", "--out", str(RUNS / piece.folder)]


def check_commit() -> None:
    inside = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    if not inside and not os.environ.get("ADAKV_COMMIT", "").strip():
        raise ValueError("No git checkout here: set ADAKV_COMMIT=<the commit this tree is> so provenance names it.")


def run_slice(piece: Slice, dry_run: bool) -> int:
    tasks = list(SUITE) if piece.name.startswith("filter") else kept_tasks()
    argv = command(piece, tasks)
    print(f"{piece.name}: about {estimate_s(piece, len(tasks)):.0f} s\n  " + " ".join(argv))
    if dry_run:
        return 0
    check_commit()
    out = _folder(piece.folder)
    before = _rows(out)
    start = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, timeout=SLICE_LIMIT_S).returncode
    except subprocess.TimeoutExpired:
        done = 124
        print(f"{piece.name} stopped at {SLICE_LIMIT_S} s: call it again to resume")
    added, seconds = _rows(out) - before, time.monotonic() - start
    print(f"{piece.name}: {added} rows in {seconds:.0f} s ({seconds / max(added, 1):.3f} s per row, load included)")
    if os.environ.get("OUT_DIR"):
        shutil.copytree(out, Path(os.environ["OUT_DIR"]) / piece.folder, dirs_exist_ok=True)
    return done


def _rows(folder: Path) -> int:
    path = folder / "results.csv"
    return max(0, sum(1 for _ in path.open()) - 1) if path.is_file() else 0


def report() -> int:
    """Reports of the three folders and the recommendation (chosen on seed A, reported on seed B)."""
    base = [sys.executable, "-m", "adakv.evaluation"]
    folders = [ROOT / "evaluation" / "results" / folder_name(kind) for kind in ("suite_dense", "seed0", "seed1")]
    for folder in folders:
        subprocess.run([*base, "report", str(folder)], check=True, stdout=subprocess.DEVNULL)
    out = ROOT / "evaluation" / "results" / folder_name("recommendation")
    return subprocess.run([*base, "recommend", str(folders[1]), str(folders[2]), "--out", str(out)]).returncode


def listing(tasks: int) -> str:
    lines, total = [], 0.0
    for piece in slices():
        seconds = estimate_s(piece, len(SUITE) if piece.name.startswith("filter") else tasks)
        total += seconds
        lines.append(f"{piece.name:10s} {seconds:5.0f} s  seed {piece.seed}  samples {piece.samples:2d}  "
                     f"{' '.join(piece.presses)}")
    lines.append(f"total about {total / 60:.0f} device minutes for {tasks} kept tasks at {CONTEXT} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print every slice with its estimated device seconds")
    parser.add_argument("--tasks-kept", type=int, default=len(SUITE), help="tasks assumed kept, for --list")
    parser.add_argument("--slice", help="run one slice by name (see --list)")
    parser.add_argument("--dry-run", action="store_true", help="print the slice's command, run nothing")
    parser.add_argument("--report", action="store_true", help="reports and recommendation of the committed folders")
    args = parser.parse_args(argv)
    try:
        if CONTEXT not in LABELS:
            raise ValueError(f"CONTEXT must be one of {sorted(LABELS)} (16k, 32k), got {CONTEXT}.")
        if args.list:
            print(listing(args.tasks_kept))
            return 0
        if args.report:
            return report()
        named = {piece.name: piece for piece in slices()}
        if args.slice not in named:
            raise ValueError(f"Unknown slice {args.slice!r}; --list names them (filter-1, A-g1-1, ..., B-g7-4).")
        return run_slice(named[args.slice], args.dry_run)
    except ValueError as error:
        print(f"gpu_eval_sweep: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
