"""Two runs on the same samples with one setting changed (evaluation/compare.py, `adakv-eval compare`).
The run folders are test fixtures (tests/test_recommend.py's writer), no model."""

from __future__ import annotations

import json

import pytest

from adakv.evaluation.cli import main
from adakv.evaluation.compare import compare
from test_recommend import scores, write_run


def bf16_and_fp8(tmp_path, fp8_adakv: int = 34):
    table_a = {("niah_single", "none", 0.0): scores(36), ("niah_single", "adakv_snapkv", 0.5): scores(35),
               ("common_words", "none", 0.0): scores(30), ("common_words", "adakv_snapkv", 0.5): scores(28)}
    table_b = {**table_a, ("niah_single", "adakv_snapkv", 0.5): scores(fp8_adakv)}
    run_a = write_run(tmp_path / "bf16", 0, table_a, {"kv_dtype": None, "out": "a"})
    run_b = write_run(tmp_path / "fp8", 0, table_b, {"kv_dtype": "float8_e4m3fn", "out": "b"})
    return run_a, run_b


def test_paired_differences_per_point_and_task_with_the_changed_setting(tmp_path):
    run_a, run_b = bf16_and_fp8(tmp_path)
    comparison = compare(run_a, run_b, resamples=500)
    assert comparison.settings == {"kv_dtype": [None, "float8_e4m3fn"]}  # "out" is where, not what
    overall = {(d.press, d.ratio): d for d in comparison.overall}
    assert overall[("none", 0.0)].difference.mean == 0 and overall[("none", 0.0)].within_noise
    fp8 = overall[("adakv_snapkv", 0.5)]
    assert fp8.difference.n == 80 and fp8.difference.mean == pytest.approx(-1 / 80)
    assert fp8.within_noise
    per_task = {(d.task, d.press): d for d in comparison.per_task}
    assert per_task[("niah_single", "adakv_snapkv")].difference.mean == pytest.approx(-1 / 40)
    assert per_task[("common_words", "adakv_snapkv")].difference.mean == 0


def test_a_large_drop_is_outside_noise_and_the_report_names_it(tmp_path, capsys):
    run_a, run_b = bf16_and_fp8(tmp_path, fp8_adakv=10)
    assert main(["compare", run_a, run_b, "--resamples", "500", "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "1 of 2 (press, ratio) points within noise**: outside, adakv_snapkv at 0.5." in report
    assert "kv_dtype: None (A) vs 'float8_e4m3fn' (B)" in report and report in capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["settings"] == {"kv_dtype": [None, "float8_e4m3fn"]}


def test_runs_on_other_samples_are_refused(tmp_path, capsys):
    table = {("niah_single", "none", 0.0): scores(36)}
    run_a = write_run(tmp_path / "a", 0, table)
    run_b = write_run(tmp_path / "b", 1, table)
    with pytest.raises(ValueError, match="do not hold the same samples \\(seed: 0 vs 1\\)"):
        compare(run_a, run_b)
    assert main(["compare", run_a, run_b]) == 2
    assert "adakv-eval compare: error:" in capsys.readouterr().err
    other = write_run(tmp_path / "c", 0, {("niah_multikey", "snapkv", 0.5): scores(3)})
    with pytest.raises(ValueError, match="share no \\(press, ratio\\)"):
        compare(run_a, other)


def test_misuse_of_the_command_names_what_was_wrong(tmp_path, capsys):
    run_a, run_b = bf16_and_fp8(tmp_path)
    assert main(["compare", run_a, run_b, "--resamples", "10"]) == 2
    assert "--resamples must be >= 100, got 10" in capsys.readouterr().err
    assert main(["compare", run_a, str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
