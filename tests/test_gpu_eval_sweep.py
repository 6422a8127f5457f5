"""scripts/gpu_eval_sweep.py on CPU: the slices fit a device call by its own estimate, seed B mirrors seed A,
the presses exist, and a slice's command takes the kept tasks of the filter slices (a fixture folder here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from adakv.evaluation import registry, tasks

ROOT = Path(__file__).resolve().parents[1]


def load(monkeypatch, context: str = "16384"):
    monkeypatch.setenv("CONTEXT", context)
    spec = importlib.util.spec_from_file_location("gpu_eval_sweep", ROOT / "scripts" / "gpu_eval_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_eval_sweep", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("context", ["16384", "31744"])
def test_every_slice_fits_one_call_and_b_mirrors_a(monkeypatch, context):
    sweep = load(monkeypatch, context)
    pieces = sweep.slices()
    assert len({p.name for p in pieces}) == len(pieces)
    for piece in pieces:  # by the script's own estimate, with all eight tasks kept
        assert sweep.estimate_s(piece, len(sweep.SUITE)) < sweep.SLICE_LIMIT_S - 60, piece
    a = [(p.presses, p.samples) for p in pieces if p.name.startswith("A-")]
    b = [(p.presses, p.samples) for p in pieces if p.name.startswith("B-")]
    assert a == b and {p.seed for p in pieces if p.name.startswith("B-")} == {1}
    assert max(p.samples for p in pieces) == 40 and sweep.SUITE == tasks.SUITE_TASKS
    presses = {press for p in pieces for press in p.presses}
    registry.check_presses_available(presses)
    assert {"none", "snapkv", "adakv_snapkv", "pyramidkv", "adakv_pyramidkv", "expected_attention", "kvzip",
            "adakv_kvzip", "adakv_model_kvzip", "streaming_llm"} <= presses


def fixture_filter(folder: Path, failing: set[str]) -> None:
    folder.mkdir(parents=True)
    rows = [{"task": task, "context_length": 16384, "sample": i, "press": "none", "ratio": 0.0,
             "score": 0.0 if task in failing else float(i % 4 > 0)} for task in tasks.SUITE_TASKS for i in range(40)]
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)


def test_a_slice_command_takes_the_kept_tasks(monkeypatch, tmp_path, capsys):
    sweep = load(monkeypatch)
    monkeypatch.setattr(sweep, "RUNS", tmp_path)
    assert sweep.main(["--slice", "A-g1-1", "--dry-run"]) == 2
    assert "run the filter slices" in capsys.readouterr().err
    fixture_filter(tmp_path / sweep.folder_name("suite_dense"), failing={"common_words", "frequent_words"})
    assert sweep.main(["--slice", "B-g4-2", "--dry-run"]) == 0
    argv = capsys.readouterr().out.splitlines()[1].split()
    kept = argv[argv.index("--tasks") + 1: argv.index("--context-length")]
    assert kept == [t for t in sorted(tasks.SUITE_TASKS) if t not in {"common_words", "frequent_words"}]
    assert argv[argv.index("--seed") + 1] == "1" and argv[argv.index("--samples") + 1] == "20"
    assert {"--cuda-graphs", "--fused-decode"} <= set(argv) and argv[argv.index("--presses") + 1:][:3] == ["none", "kvzip", "adakv_kvzip"]
    assert argv[argv.index("--ratios") + 1: argv.index("--seed")] == ["0.5", "0.75", "0.875", "0.9375"]


def test_refusals_are_one_line(monkeypatch, tmp_path, capsys):
    sweep = load(monkeypatch)
    assert sweep.main(["--slice", "nope"]) == 2 and "Unknown slice" in capsys.readouterr().err
    bad = load(monkeypatch, "8192")
    assert bad.main(["--list"]) == 2 and "CONTEXT must be one of" in capsys.readouterr().err
    monkeypatch.setattr(sweep, "ROOT", tmp_path)  # a copy of the tree without git
    monkeypatch.delenv("ADAKV_COMMIT", raising=False)
    with pytest.raises(ValueError, match="ADAKV_COMMIT"):
        sweep.check_commit()
    monkeypatch.setenv("ADAKV_COMMIT", "0" * 40)
    sweep.check_commit()
