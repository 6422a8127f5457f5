"""costs.csv (KV bytes held, peak memory, prefill and decode time per press) and the report table joining
it to the scores, on a tiny random Llama over SmolLM2's tokenizer (CPU)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
from transformers import DynamicCache

from adakv.evaluation import costs, engine, tasks
from adakv.evaluation.report import cost_table, family_of, write_reports
from adakv.evaluation.runner import SweepConfig, run_sweep

from test_evaluation import model, tokenizer  # noqa: F401 (pytest fixtures: a tiny Llama of LAYERS x KV_HEADS x HEAD_DIM)

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 16


def config(**overrides) -> SweepConfig:
    settings = dict(tasks=["niah_single", "variable_tracking"], context_lengths=[256], samples=1,
                    presses=["none", "snapkv", "adakv_snapkv"], ratios=[0.5, 0.75], check_naive=0)
    return SweepConfig(**{**settings, **overrides})


def test_held_bytes_of_a_dense_cache_are_its_keys_and_values(model, tokenizer):
    haystack = tasks.Haystack(tokenizer)
    sample = tasks.generate("niah_single", 0, haystack, 256)
    context_ids, _ = engine.encode_prompt(tokenizer, sample, "cpu")
    cache = engine.prefill(model, context_ids)
    tokens = context_ids.shape[1]
    assert costs.held_kv_bytes(cache) == LAYERS * 2 * KV_HEADS * tokens * HEAD_DIM * 4  # float32
    assert costs.held_kv_bytes(DynamicCache()) == 0
    _, question_ids = engine.encode_prompt(tokenizer, sample, "cpu")
    before = [layer.keys.clone() for layer in cache.layers]
    assert costs.decode_steps(model, cache, question_ids, 5, warmup=2) > 0
    assert cache.get_seq_length() == tokens  # rolled back to the context
    assert all(torch.equal(layer.keys, keys) for layer, keys in zip(cache.layers, before))


def test_runner_records_one_cost_row_per_setting_and_resumes(model, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    run_sweep(config(), out, model=model, tokenizer=tokenizer, progress=False)
    table = pd.read_csv(os.path.join(out, "costs.csv"))
    assert list(zip(table.press, table.ratio)) == [("none", 0.0), ("snapkv", 0.5), ("snapkv", 0.75),
                                                   ("adakv_snapkv", 0.5), ("adakv_snapkv", 0.75)]
    dense = table[table.press == "none"]
    assert dense.kv_kept_bytes.iloc[0] == dense.kv_bytes.iloc[0]  # a dense cache holds what it attends to
    for ratio in (0.5, 0.75):
        row = table[(table.press == "snapkv") & (table.ratio == ratio)]
        expected = LAYERS * KV_HEADS * round((1 - ratio) * row.context_tokens.iloc[0]) * 2 * HEAD_DIM * 4
        assert abs(row.kv_kept_bytes.iloc[0] - expected) <= LAYERS * KV_HEADS * 2 * HEAD_DIM * 4  # one token of rounding
        # evicted rows plus slack for the tokens to come: more than kept, less than dense
        assert row.kv_kept_bytes.iloc[0] < row.kv_bytes.iloc[0] < dense.kv_bytes.iloc[0]
    assert table.peak_memory_bytes.isna().all()  # not measured off CUDA
    assert (table.prefill_s > 0).all() and (table.decode_ms_per_token > 0).all()
    assert (table.decode_tokens == costs.DECODE_TOKENS).all() and set(table.task) == {"niah_single"}
    # a resumed run with one more ratio measures only the new settings
    run_sweep(config(ratios=[0.5, 0.75, 0.875]), out, model=model, tokenizer=tokenizer, progress=False)
    grown = pd.read_csv(os.path.join(out, "costs.csv"))
    assert len(grown) == len(table) + 2 and not grown.duplicated(["context_length", "press", "ratio"]).any()
    assert grown.iloc[: len(table)].equals(table)


def test_report_joins_scores_and_costs(model, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    run_sweep(config(), out, model=model, tokenizer=tokenizer, progress=False)
    joined = pd.read_csv(os.path.join(out, "costs_table.csv"))
    assert set(joined.columns) >= {"score", "kv_kept_mib", "kv_held_mib", "kv_vs_dense", "peak_mib", "prefill_s", "decode_ms_per_token"}
    assert joined[joined.press == "none"].kv_vs_dense.iloc[0] == 1.0
    assert (joined[joined.press != "none"].kv_vs_dense < 0.6).all()
    results = pd.read_csv(os.path.join(out, "results.csv"), keep_default_na=False)
    mean = results[(results.press == "snapkv") & (results.ratio == 0.5)].score.mean()
    assert joined[(joined.press == "snapkv") & (joined.ratio == 0.5)].score.iloc[0] == pytest.approx(mean)
    assert "Accuracy, KV held, peak memory" in open(os.path.join(out, "summary.md")).read()
    assert os.path.exists(os.path.join(out, "accuracy_vs_kv.png"))


def test_no_costs_switch_writes_none(model, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    run_sweep(config(costs=False, presses=["none"]), out, model=model, tokenizer=tokenizer, progress=False)
    assert not os.path.exists(os.path.join(out, "costs.csv"))
    assert not os.path.exists(os.path.join(out, "costs_table.csv"))
    write_reports(out, plots=False)  # a folder without costs still reports


def test_cost_table_of_a_fixture_and_families():
    results = pd.DataFrame({"task": ["niah_single"] * 4, "context_length": 16384, "sample": [0, 1, 0, 1],
                            "press": ["none", "none", "snapkv", "snapkv"], "ratio": [0.0, 0.0, 0.5, 0.5],
                            "score": [1.0, 1.0, 1.0, 0.0]})
    fixture = pd.DataFrame({"context_length": 16384, "press": ["none", "snapkv"], "ratio": [0.0, 0.5],
                            "kv_bytes": [4 << 20, 2 << 20], "kv_kept_bytes": [4 << 20, 1 << 20], "peak_memory_bytes": [8 << 20, 5 << 20],
                            "prefill_s": [1.0, 1.2], "decode_ms_per_token": [20.0, 10.0]})
    table = cost_table(results, fixture)
    assert list(table.kv_vs_dense) == [1.0, 0.25] and list(table.peak_mib) == [8.0, 5.0]
    assert list(table.score) == [1.0, 0.5] and list(table.kv_kept_mib) == [4.0, 1.0] and list(table.kv_held_mib) == [4.0, 2.0]
    assert [family_of(t) for t in ("niah_distractor", "variable_tracking", "frequent_words")] == \
        ["retrieval", "multi-hop", "aggregation"]
