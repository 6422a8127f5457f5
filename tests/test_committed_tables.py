"""The committed tables of a run folder equal what the report regenerates from its raw results
(`adakv-eval check`). The long-context sweep's folders are checked when committed; the checker itself is
tested on a fixture folder (results.csv and costs.csv written by hand)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from adakv.evaluation.cli import main
from adakv.evaluation.report import regenerated_differences, write_reports

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p for pattern in ("*_16k_*_h200", "*_32k_*_h200")
                for p in (ROOT / "evaluation" / "results").glob(pattern) if (p / "results.csv").is_file())


def fixture_folder(tmp_path) -> Path:
    folder = tmp_path / "fixture_run"
    folder.mkdir(parents=True)
    rows = [{"task": task, "context_length": 16384, "sample": i, "press": press, "ratio": ratio,
             "score": float((i + len(press)) % 3 > 0), "answer": "", "expected": "[]"}
            for task in ("niah_single", "variable_tracking") for i in range(6)
            for press, ratio in (("none", 0.0), ("snapkv", 0.5), ("adakv_snapkv", 0.5))]
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    pd.DataFrame({"context_length": 16384, "press": ["none", "snapkv", "adakv_snapkv"], "ratio": [0.0, 0.5, 0.5],
                  "task": "niah_single", "context_tokens": 16400, "kv_bytes": [400, 260, 260],
                  "kv_kept_bytes": [400, 200, 200], "peak_memory_bytes": [900, 700, 710], "prefill_s": [1.0, 1.1, 1.2],
                  "decode_ms_per_token": [9.0, 7.0, 7.5], "decode_tokens": 32, "device": "cuda:0",
                  "cuda_graphs": True, "fused_decode": True}).to_csv(folder / "costs.csv", index=False)
    write_reports(str(folder), plots=False)
    return folder


def test_a_freshly_reported_folder_agrees(tmp_path, capsys):
    folder = fixture_folder(tmp_path)
    assert regenerated_differences(str(folder)) == []
    assert main(["check", str(folder)]) == 0 and capsys.readouterr().out.strip().endswith(": ok")


def test_an_edited_table_or_raw_result_is_caught(tmp_path, capsys):
    folder = fixture_folder(tmp_path)
    summary = pd.read_csv(folder / "summary.csv")
    summary.loc[0, "score"] += 0.01  # a hand-edited figure
    summary.to_csv(folder / "summary.csv", index=False)
    assert [d.split(":")[0] for d in regenerated_differences(str(folder))] == ["summary.csv"]
    assert main(["check", str(folder)]) == 1 and "summary.csv: differs" in capsys.readouterr().out

    folder = fixture_folder(tmp_path / "second")
    results = pd.read_csv(folder / "results.csv", keep_default_na=False)
    results.loc[results.press == "snapkv", "score"] = 1.0  # raw results changed after the tables were written
    results.to_csv(folder / "results.csv", index=False)
    named = {d.split(":")[0] for d in regenerated_differences(str(folder))}
    assert {"summary.csv", "per_task.csv", "costs_table.csv", "summary.md"} <= named


def test_a_missing_committed_table_is_caught(tmp_path):
    folder = fixture_folder(tmp_path)
    (folder / "costs_table.csv").unlink()
    assert regenerated_differences(str(folder)) == ["costs_table.csv: the report writes it, but it is not committed"]


def test_check_refuses_what_is_not_a_run_folder(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error


@pytest.mark.skipif(not SWEEPS, reason="no long-context sweep committed yet (the checker is tested on a fixture)")
@pytest.mark.parametrize("folder", SWEEPS, ids=[p.name for p in SWEEPS])
def test_committed_sweep_tables_equal_the_regenerated_ones(folder):
    assert regenerated_differences(str(folder)) == []


def test_vs_none_pairs_each_press_with_the_dense_answers_of_the_same_samples(tmp_path):
    folder = fixture_folder(tmp_path)
    results = pd.read_csv(folder / "results.csv", keep_default_na=False)
    versus = pd.read_csv(folder / "vs_none.csv")
    assert set(versus.task) == {"all", "niah_single", "variable_tracking"} and set(versus.press) == {"snapkv", "adakv_snapkv"}
    for row in versus.itertuples():
        part = results if row.task == "all" else results[results.task == row.task]
        mine = part[part.press == row.press].sort_values(["task", "sample"]).score.to_numpy()
        dense = part[part.press == "none"].sort_values(["task", "sample"]).score.to_numpy()
        assert row.difference == pytest.approx((mine - dense).mean()) and row.n == len(mine)
        assert row.low <= row.difference <= row.high


FOLDERS = sorted(p for p in (ROOT / "evaluation" / "results").iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_committed_folder_says_where_its_rows_came_from(folder):
    """Issue 24, item 4: each run into a folder is listed with its device, GPU, seed and commit; folders written
    before runs recorded this carry reconstructed entries (evaluation/results/README.md) naming the commit of
    their rows instead of the commit that ran them."""
    import json

    config = json.loads((folder / "config.json").read_text())
    runs = config.get("provenance")
    assert runs, f"{folder.name}: config.json lists no run under 'provenance'"
    for run in runs:
        assert run["device"] == config["device"] or str(run["device"]).startswith(config["device"])
        assert run["seed"] == config["seed"]
        assert (run["gpu"] is None) == (run["device"] == "cpu"), run
        if "reconstructed" in run:
            assert len(run["results_commit"]) == 40
            assert run["equivalent_command"].startswith("adakv-eval run ")
        else:
            assert run["adakv_commit"] and run["date"] and run["command"] and run["torch"]
