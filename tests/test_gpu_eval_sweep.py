"""scripts/gpu_eval_sweep.py on CPU: the plan fits the issue's budget by its own estimate, seed B holds "none" and
A's picks only, the stages' commands carry the kept tasks and the decode switches, and `--next` runs the stages in
order (filter, A with the filter's "none" rows, B from A's picks) with the runner replaced by a fixture writer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from adakv.evaluation import registry, runner, tasks

ROOT = Path(__file__).resolve().parents[1]


def load(monkeypatch, context: str = "16384"):
    monkeypatch.setenv("CONTEXT", context)
    spec = importlib.util.spec_from_file_location("gpu_eval_sweep", ROOT / "scripts" / "gpu_eval_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_eval_sweep", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_plan_fits_the_budget_and_names_every_press(monkeypatch):
    sweep = load(monkeypatch)
    monkeypatch.setattr(sweep, "phases", lambda: (dict(sweep.PHASES_S[16384]), "PHASES_S"))
    work, calls, total = sweep.plan(len(sweep.SUITE))
    assert total <= 46 * 60 and calls <= 7  # issue 24's sweep at 16k with all eight tasks kept (it was 339 minutes)
    assert sweep.plan(6)[2] <= 36 * 60
    stages = {stage.name: stage for stage, _ in work}
    assert (stages["filter"].presses, stages["filter"].seed) == (("none",), 0) and sweep.SUITE == tasks.SUITE_TASKS
    assert stages["A"].seed == 0 and stages["B"].seed == 1 and stages["A"].costs and not stages["B"].costs
    registry.check_presses_available(stages["A"].presses)
    assert {"none", "snapkv", "adakv_snapkv", "pyramidkv", "adakv_pyramidkv", "expected_attention", "kvzip",
            "adakv_kvzip", "adakv_model_kvzip", "streaming_llm"} <= set(stages["A"].presses)
    # B costs a fraction of A: "none" and a few presses, not the grid
    assert dict((s.name, t) for s, t in work)["B"] < 0.7 * dict((s.name, t) for s, t in work)["A"]
    # 32k stays plannable (more calls); an unknown length is refused
    assert load(monkeypatch, "31744").plan(8)[1] > calls
    assert load(monkeypatch, "8192").main(["--list"]) == 2


def test_a_committed_gpu_profile_replaces_the_extrapolation(monkeypatch, tmp_path):
    sweep = load(monkeypatch)
    profile = {"generate_s": 0.04, "dense_prefill_s": 0.2, "none": {"compress_s": 0.01, "answer_s": 0.3},
               "batched": {"compress_s": 2.5, "decode_s": 0.25},
               "rows": [{"press": "snapkv", "batched_compress_s": 0.05}, {"press": "kvzip", "batched_compress_s": 1.02},
                        {"press": "kvzip", "batched_compress_s": 0.02}, {"press": "adakv_model_kvzip",
                                                                         "batched_compress_s": 0.03}]}
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)
    (folder / f"profile_eval_sample_{sweep.MODEL}_16384_cuda.json").write_text(json.dumps(profile))
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    phase, source = sweep.phases()
    assert source.endswith("_cuda.json") and phase["kvzip"] == pytest.approx(1.0)
    assert phase["setting"] == pytest.approx(1.5 / 4) and phase["decode"] == 0.25


# -- fixture folders ------------------------------------------------------------------------------------

def fixture_rows(config, score) -> list[dict]:
    return [{"task": task, "context_length": config.context_lengths[0], "sample": i, "press": press, "ratio": ratio,
             "score": score(task, press, ratio, i), "answer": "", "expected": "[]", "depth": "", "context_tokens": 1,
             "seconds": 0.1} for task in config.tasks for i in range(config.samples) for press, ratio in config.settings()]


def score(task, press, ratio, i):
    """The dense model fails common_words and frequent_words; adakv_model_kvzip is best up to 0.875, then snapkv."""
    if task in {"common_words", "frequent_words"}:
        return 0.0
    if press == "none":
        return float(i % 8 > 0)
    best = "adakv_model_kvzip" if ratio < 0.9 else "snapkv"
    return float(i % 8 > (1 if press == best else 4))


def fake_run_sweep(calls):
    def run_sweep(config, out, model=None, tokenizer=None, progress=True, deadline=None):
        calls.append((Path(out).name, config))
        done = runner.read_results(out)
        rows = pd.DataFrame(fixture_rows(config, score))
        if not done.empty:
            rows = rows.merge(done[runner.KEY_COLUMNS], on=runner.KEY_COLUMNS, how="left", indicator=True)
            rows = rows[rows._merge == "left_only"].drop(columns="_merge")
        runner.prepare_run_folder(out, config)
        pd.concat([done, rows]).to_csv(Path(out) / "results.csv", index=False)
        if config.costs:
            costs = [{"context_length": config.context_lengths[0], "press": p, "ratio": r} for p, r in config.settings()]
            pd.DataFrame(costs).to_csv(Path(out) / "costs.csv", index=False)
        return runner.read_results(out)
    return run_sweep


def test_next_runs_filter_then_a_then_b_from_a_s_picks(monkeypatch, tmp_path, capsys):
    sweep = load(monkeypatch)
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(sweep, "ROOT", ROOT)
    calls = []
    monkeypatch.setattr(runner, "run_sweep", fake_run_sweep(calls))
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: (None, None))
    with pytest.raises(ValueError, match="No filter results"):
        sweep.kept_tasks()
    assert sweep.main(["--next"]) == 0
    names = [name for name, _ in calls]
    assert names == [sweep.folder_name("suite_dense"), sweep.folder_name("seed0"), sweep.folder_name("seed1")]
    filter_config, a_config, b_config = (config for _, config in calls)
    kept = sorted(t for t in tasks.SUITE_TASKS if t not in {"common_words", "frequent_words"})
    assert filter_config.tasks == list(tasks.SUITE_TASKS) and a_config.tasks == kept == b_config.tasks
    assert all(c.batch_answers and c.cuda_graphs and c.fused_decode for c in (filter_config, a_config, b_config))
    assert (a_config.seed, b_config.seed, a_config.costs, b_config.costs) == (0, 1, True, False)
    assert b_config.presses == ["none", "adakv_model_kvzip", "snapkv"]  # A's picks per ratio, nothing else
    # A's "none" rows are the filter's, and its provenance says so
    a_folder = sweep.RUNS / sweep.folder_name("seed0")
    provenance = json.loads((a_folder / "config.json").read_text())["provenance"]
    assert provenance[0]["copied_rows"]["press"] == "none" and provenance[0]["copied_rows"]["rows"] == len(kept) * 40
    assert "complete" in capsys.readouterr().out
    # once complete nothing runs again; the status and the commands say what each stage holds
    assert sweep.main(["--next"]) == 0 and len(calls) == 3
    assert "complete" in sweep.status()
    lines = sweep.dry_run().splitlines()
    b_argv = lines[2].split()
    assert b_argv[b_argv.index("--presses") + 1: b_argv.index("--ratios")] == ["none", "adakv_model_kvzip", "snapkv"]
    assert "--no-costs" in b_argv and "--batch-answers" in b_argv and b_argv[b_argv.index("--seed") + 1] == "1"
    a_argv = lines[1].split()
    assert a_argv[a_argv.index("--tasks") + 1: a_argv.index("--context-length")] == kept
    assert a_argv[a_argv.index("--ratios") + 1: a_argv.index("--seed")] == ["0.5", "0.75", "0.875", "0.9375"]
    assert "B" in sweep.listing(6) and "assumed" not in sweep.listing(6)  # B's real presses once A is complete


def test_refusals_are_one_line(monkeypatch, tmp_path, capsys):
    sweep = load(monkeypatch)
    assert sweep.main([]) == 2 and "Give one of" in capsys.readouterr().err
    monkeypatch.setattr(sweep, "ROOT", tmp_path)  # a copy of the tree without git
    monkeypatch.delenv("ADAKV_COMMIT", raising=False)
    with pytest.raises(ValueError, match="ADAKV_COMMIT"):
        sweep.check_commit()
    monkeypatch.setenv("ADAKV_COMMIT", "0" * 40)
    sweep.check_commit()
