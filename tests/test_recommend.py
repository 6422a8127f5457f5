"""Choose on one seed, report on the other (evaluation/recommend.py), and the task filter
(evaluation/suite.py). The run folders here are test fixtures: results.csv written by hand, no model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from adakv.evaluation import suite
from adakv.evaluation.cli import main
from adakv.evaluation.recommend import bootstrap_interval, picks_on_a, recommend, write_recommendation

N = 40  # samples per task


def scores(correct: int, n: int = N) -> list[float]:
    """`correct` ones then zeros: a fixture score column of n samples."""
    return [1.0] * correct + [0.0] * (n - correct)


def write_run(folder, seed: int, table: dict, config: dict | None = None):
    """Fixture run folder: table maps (task, press, ratio) -> per-sample scores."""
    folder.mkdir(parents=True)
    rows = [{"task": task, "context_length": 16384, "sample": i, "press": press, "ratio": ratio, "score": s,
             "answer": "", "expected": "[]"}
            for (task, press, ratio), values in table.items() for i, s in enumerate(values)]
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    written = {"model": "qwen2.5-coder-1.5b", "context_lengths": [16384], "query_aware": False, "backend": None,
               "dtype": "auto", "seed": seed, **(config or {})}
    (folder / "config.json").write_text(json.dumps(written))
    return str(folder)


def fixture_a():
    return {("niah_single", "none", 0.0): scores(36), ("common_words", "none", 0.0): scores(0),
            ("niah_single", "snapkv", 0.5): scores(30), ("niah_single", "adakv_snapkv", 0.5): scores(35),
            ("niah_single", "snapkv", 0.875): scores(20), ("niah_single", "adakv_snapkv", 0.875): scores(10),
            ("common_words", "snapkv", 0.5): scores(0), ("common_words", "adakv_snapkv", 0.5): scores(0),
            ("common_words", "snapkv", 0.875): scores(0), ("common_words", "adakv_snapkv", 0.875): scores(0)}


def fixture_b(adakv_05: int = 31, snapkv_05: int = 33):
    table = dict(fixture_a())
    table[("niah_single", "none", 0.0)] = scores(34)
    table[("niah_single", "adakv_snapkv", 0.5)] = scores(adakv_05)
    table[("niah_single", "snapkv", 0.5)] = scores(snapkv_05)
    table[("common_words", "none", 0.0)] = scores(20)  # solved on B: still left out (the filter reads A)
    return table


def test_bootstrap_interval_is_deterministic_and_covers_the_mean():
    values = [1, 0, 0, -1, 0, 1, 1, 0, 0, -1] * 4
    a, b = bootstrap_interval(values), bootstrap_interval(values)
    assert a == b and a.n == 40 and a.low < a.mean < a.high
    assert a.mean == pytest.approx(np.mean(values))
    wide = bootstrap_interval(values[:10])
    assert wide.high - wide.low > a.high - a.low  # fewer pairs, wider interval
    constant = bootstrap_interval([-0.25] * 12)
    assert constant.low == constant.high == constant.mean == -0.25
    with pytest.raises(ValueError, match="No paired samples"):
        bootstrap_interval([])


def test_task_filter_keeps_what_the_dense_model_solves(tmp_path):
    results = pd.read_csv(write_run(tmp_path / "a", 0, fixture_a()) + "/results.csv")
    verdicts = {v.task: v for v in suite.task_verdicts(results)}
    assert verdicts["niah_single"].kept and verdicts["niah_single"].dense_score == pytest.approx(0.9)
    assert not verdicts["common_words"].kept and "does not clear chance" in verdicts["common_words"].reason
    assert set(suite.kept_rows(results, list(verdicts.values())).task) == {"niah_single"}
    # one correct in 40 is not above the 1/50 chance of a single needle
    barely = pd.DataFrame({"task": "niah_single", "context_length": 16384, "press": "none", "score": scores(1)})
    assert not suite.task_verdicts(barely)[0].kept
    with pytest.raises(ValueError, match="no rows of press 'none'"):
        suite.task_verdicts(results[results.press != "none"])


def test_chosen_on_a_reported_on_b(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    run_b = write_run(tmp_path / "b", 1, fixture_b())
    rec = recommend(run_a, run_b, max_drop=0.05)
    # on A: 0.5 -> adakv_snapkv (35/40, drop 1/40); 0.875 -> snapkv (20/40, drop 16/40 > 0.05): 0.5 is chosen
    assert [(p.press, p.ratio) for p in rec.picks_a] == [("adakv_snapkv", 0.5), ("snapkv", 0.875)]
    assert (rec.chosen.press, rec.chosen.ratio, rec.within_max_drop_on_a) == ("adakv_snapkv", 0.5, True)
    assert rec.chosen.difference.mean == pytest.approx(-1 / 40)
    # the reported figures are B's: 31/40 against 34/40 on B's samples
    assert rec.confirmed.score == pytest.approx(31 / 40) and rec.confirmed.dense_score == pytest.approx(34 / 40)
    assert rec.confirmed.difference.mean == pytest.approx(-3 / 40) and rec.confirmed.difference.n == N
    assert rec.confirmed.difference.low <= -3 / 40 <= rec.confirmed.difference.high
    assert [row["task"] for row in rec.per_task_b] == ["niah_single"]
    assert [v["task"] for v in rec.tasks_left_out] == ["common_words"]


def test_b_never_changes_the_choice(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    # on B snapkv beats adakv_snapkv at 0.5 by far: the choice (made on A) stays adakv_snapkv
    run_b = write_run(tmp_path / "b", 1, fixture_b(adakv_05=5, snapkv_05=40))
    rec = recommend(run_a, run_b)
    assert (rec.chosen.press, rec.chosen.ratio) == ("adakv_snapkv", 0.5)
    assert rec.confirmed.score == pytest.approx(5 / 40) and rec.confirmed.difference.high < 0


def test_b_needs_only_none_and_the_picks_of_a(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    full = recommend(run_a, write_run(tmp_path / "b", 1, fixture_b()))
    picks = [(p.press, p.ratio) for p in picks_on_a(run_a)]
    assert picks == [("adakv_snapkv", 0.5), ("snapkv", 0.875)]
    only_picks = {k: v for k, v in fixture_b().items() if k[1] == "none" or (k[1], k[2]) in picks}
    trimmed = recommend(run_a, write_run(tmp_path / "c", 1, only_picks))
    assert (trimmed.chosen, trimmed.confirmed, trimmed.picks_b) == (full.chosen, full.confirmed, full.picks_b)
    # A's choice is made over everything A holds: a B that lacks a pick is refused, not chosen around
    lacking = {k: v for k, v in only_picks.items() if k[1:] != ("snapkv", 0.875)}
    with pytest.raises(ValueError, match="lacks A's pick.*snapkv at 0.875"):
        recommend(run_a, write_run(tmp_path / "d", 1, lacking))


def test_a_strict_max_drop_falls_back_to_the_lowest_ratio(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    run_b = write_run(tmp_path / "b", 1, fixture_b())
    rec = recommend(run_a, run_b, max_drop=0.0)
    assert (rec.chosen.press, rec.chosen.ratio, rec.within_max_drop_on_a) == ("adakv_snapkv", 0.5, False)
    assert recommend(run_a, run_b, max_drop=0.5).chosen.ratio == 0.875


def test_refusals(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    same_seed = write_run(tmp_path / "b", 0, fixture_b())
    with pytest.raises(ValueError, match="best-of-N"):
        recommend(run_a, same_seed)
    other_model = write_run(tmp_path / "c", 1, fixture_b(), {"model": "smollm2"})
    with pytest.raises(ValueError, match="not the same sweep.*model"):
        recommend(run_a, other_model)
    no_dense = write_run(tmp_path / "d", 1, {k: v for k, v in fixture_a().items() if k[1] != "none"})
    with pytest.raises(ValueError, match="press 'none'"):
        recommend(no_dense, run_a)
    with pytest.raises(ValueError, match="max_drop"):
        recommend(run_a, write_run(tmp_path / "e", 1, fixture_b()), max_drop=2)


def test_cli_writes_markdown_and_json(tmp_path, capsys):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    run_b = write_run(tmp_path / "b", 1, fixture_b())
    assert main(["recommend", run_a, run_b, "--out", str(tmp_path / "rec")]) == 0
    text = (tmp_path / "rec" / "recommendation.md").read_text()
    assert "adakv_snapkv at ratio 0.5" in text and "chosen on seed 0, reported on seed 1" in text
    assert "common_words" in text and text in capsys.readouterr().out
    written = json.loads((tmp_path / "rec" / "recommendation.json").read_text())
    assert written["confirmed"]["difference"]["mean"] == pytest.approx(-3 / 40) and written["seed_b"] == 1
    assert main(["recommend", run_a, str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error and "Traceback" not in error
    assert main(["recommend", run_a, run_a]) == 2 and "best-of-N" in capsys.readouterr().err


def test_write_recommendation_defaults_beside_b(tmp_path):
    run_a = write_run(tmp_path / "a", 0, fixture_a())
    run_b = write_run(tmp_path / "b", 1, fixture_b())
    md, js = write_recommendation(recommend(run_a, run_b), run_b)
    assert md.endswith("b/recommendation.md") and json.loads(open(js).read())["chosen"]["press"] == "adakv_snapkv"


def test_task_filter_command_and_report_section(tmp_path, capsys):
    from adakv.evaluation.report import write_reports

    run_a = write_run(tmp_path / "a", 0, fixture_a())
    assert main(["tasks", run_a, "--kept"]) == 0
    assert capsys.readouterr().out.strip() == "niah_single"
    assert main(["tasks", run_a]) == 0
    table = capsys.readouterr().out
    assert "common_words" in table and "does not clear chance" in table
    write_reports(run_a, plots=False)
    written = pd.read_csv(tmp_path / "a" / "tasks_above_chance.csv")
    assert dict(zip(written.task, written.kept)) == {"common_words": False, "niah_single": True}
    no_dense = write_run(tmp_path / "d", 1, {k: v for k, v in fixture_a().items() if k[1] != "none"})
    assert main(["tasks", no_dense]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "press 'none'" in error
