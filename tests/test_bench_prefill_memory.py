"""benchmarks/bench_prefill_memory.py (issue 23, item 4) end to end on a tiny random Llama on CPU: the rows'
schema, the .md written from them, rows of separate calls accumulating in one file, the targets it checks,
and a KV dtype asked for only where the press takes it. The GPU figures come from the GPU run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from adakv import presses as P

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ("method", "batch", "context", "ratio", "kv_dtype", "peak_gib", "kv_gib", "ttft_s", "decode_ms", "limit_ms")
TINY = ["--device", "cpu", "--tiny", "--layers", "2", "--decode-steps", "2", "--decode-warmup", "1", "--warmup-context", "16"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_prefill_memory", ROOT / "benchmarks" / "bench_prefill_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_of_separate_calls_accumulate_in_one_file(bench, tmp_path):
    bench.main([*TINY, "--cases", "1x96", "--mlp-chunk-rows", "32", "--out", str(tmp_path)])
    bench.main([*TINY, "--cases", "2x48", "--methods", "dense-dynamic", "adakv-snapkv", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("prefill_memory_*.json")
    report = json.loads(json_file.read_text())
    assert len(report["runs"]) == 2 and report["meta"] == report["runs"][1]
    for key in ("gpu", "torch", "transformers", "adakv_commit", "date", "copy_bandwidth_tb_s"):
        assert key in report["meta"]
    assert report["meta"]["torch"] == torch.__version__
    rows = report["rows"]
    assert [(r["method"], r["batch"], r["run"]) for r in rows] == [
        ("dense-dynamic", 1, 0), ("dense-mlp-rows", 1, 0), ("adakv-snapkv", 1, 0), ("adakv-kvzip", 1, 0),
        ("dense-static", 1, 0), ("dense-dynamic", 2, 1), ("adakv-snapkv", 2, 1),
    ]  # fmt: skip
    assert [r["mlp_chunk_rows"] for r in rows] == [None, 32, 32, 32, None, None, 8192]
    for row in rows:
        assert "error" not in row, row
        assert all(key in row for key in SCHEMA)
        assert row["kv_dtype"] == "bfloat16" and row["stored_kv_dtypes"] == ["bfloat16"]
        assert row["peak_gib"] > 0 and row["ttft_s"] > 0 and row["decode_ms"] > 0 and row["limit_ms"] > 0
        assert row["leftover_gib"] == 0 and row["switches"] == []  # no speed switch on a CPU
        assert len(row["steps_ms"]) == 1 + 2  # --decode-warmup + --decode-steps intervals
    dense, dense_rows, snapkv, kvzip, static = rows[:5]
    assert dense_rows["peak_gib"] < dense["peak_gib"]  # the MLP over 32 rows at a time: a lower peak
    assert dense_rows["kv_gib"] == dense["kv_gib"] and dense_rows["tokens_sha256"] == dense["tokens_sha256"]
    assert snapkv["ratio"] == kvzip["ratio"] == 0.75 and dense["ratio"] == 0.0
    # the rows in use (at 96 tokens the flat layers' 64 slack rows per head dominate what is held)
    assert snapkv["kv_read_gib"] < 0.5 * dense["kv_read_gib"] and kvzip["kv_read_gib"] < 0.5 * dense["kv_read_gib"]
    assert snapkv["limit_ms"] < dense["limit_ms"] and snapkv["kv_gib"] < dense["kv_gib"]
    assert static["kv_gib"] >= dense["kv_gib"] and static["compiled"] is False  # generate compiles on a GPU only
    md = (tmp_path / f"{json_file.stem}.md").read_text()
    assert md == bench.render(report)  # the .md is written from every row of the file
    assert "## Targets (issue 23)" in md and "Not measured yet" in md  # the tiny cases are not the issue's
    assert md.count("| 1 x 96 |") == 5 and md.count("| 2 x 48 |") == 2


def test_targets_are_the_issues(bench):
    def row(method, batch, context, kv_dtype="bfloat16", **figures):
        ratio = 0.0 if method.startswith("dense") else 0.75
        return dict(method=method, batch=batch, context=context, ratio=ratio, kv_dtype=kv_dtype, switches=[], **figures)

    rows = [
        row("dense-dynamic", 1, 131072, peak_gib=45.6, kv_gib=16.0, ttft_s=10.0, x_limit=10.0),
        row("adakv-snapkv", 1, 131072, peak_gib=33.5, kv_gib=4.0, ttft_s=10.5, x_limit=1.2),
        row("adakv-snapkv", 1, 131072, "float8_e4m3fn", peak_gib=31.0, kv_gib=2.2, ttft_s=10.5, x_limit=1.4),
        row("dense-dynamic", 1, 32768, peak_gib=22.6, kv_gib=4.0, ttft_s=1.5, x_limit=10.0),
        row("adakv-kvzip", 1, 32768, peak_gib=22.0, kv_gib=1.0, ttft_s=4.5, x_limit=1.2),
        row("adakv-kvzip", 8, 32768, peak_gib=70.0, kv_gib=8.0, ttft_s=40.0, x_limit=1.2),  # no dense row: no ratio
    ]
    found = {(t["target"], t["kv_dtype"]): t for t in bench.targets(rows)}
    assert len(found) == 5
    peak = found["peak <= dense peak - r x dense KV", "bfloat16"]
    assert peak["bound"] == pytest.approx(45.6 - 0.75 * 16.0) and peak["met"]
    assert found["peak <= dense peak - r x dense KV", "float8_e4m3fn"]["met"]  # 31.0 <= 33.6
    ttft = found["KVzip TTFT <= 2.0x dense", "bfloat16"]
    assert ttft["measured"] == pytest.approx(3.0) and not ttft["met"]
    kv = found["KV <= 0.52x the bfloat16 KV", "float8_e4m3fn"]
    assert kv["measured"] == pytest.approx(0.55) and not kv["met"]
    assert found["decode <= 1.3x its limit", "float8_e4m3fn"]["met"] is False
    meta = dict(device="GPU", layers=32, tiny=False, weights_held_gib=15.0, ratio=0.75)
    md = bench.render(dict(meta=meta, runs=[], rows=[], targets=bench.targets(rows)))
    assert md.count("| no (margin") == 3 and md.count("| yes (margin") == 2 and "Not measured yet" not in md


def test_a_kv_dtype_is_asked_for_only_where_the_press_takes_it(bench, tmp_path, monkeypatch):
    assert bench.kv_dtype_refusal("bfloat16") is None and bench.press_options("bfloat16") == {}
    try:
        P.AdaptivePress(P.SnapKVPress(0.5), **bench.press_options("float8_e4m3fn"))
        takes_fp8 = True
    except (TypeError, ValueError, AttributeError):
        takes_fp8 = False
    assert (bench.kv_dtype_refusal("float8_e4m3fn") is None) == takes_fp8
    # a value the press's field rule refuses counts as not taken, like an option it does not declare
    monkeypatch.setattr(bench, "press_options", lambda kv_dtype: {"backend": kv_dtype})
    assert "float16" in bench.kv_dtype_refusal("float16")
    monkeypatch.undo()
    if not takes_fp8:  # refused before any model is built, naming the option and what to run instead
        monkeypatch.setattr(bench, "build_model", lambda *args, **kwargs: pytest.fail("a model was built"))
        with pytest.raises(SystemExit, match=r"float8_e4m3fn.*--kv-dtypes bfloat16"):
            bench.main([*TINY, "--kv-dtypes", "bf16", "fp8", "--out", str(tmp_path)])


def test_fp8_rows_hold_fp8_and_about_half_the_bf16_kv(bench, tmp_path):
    bench.main([*TINY, "--cases", "1x96", "--methods", "adakv-snapkv", "--kv-dtypes", "bf16", "fp8", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("prefill_memory_*.json")
    report = json.loads(json_file.read_text())
    bf16, fp8 = report["rows"]
    assert "error" not in fp8 and fp8["kv_dtype"] == fp8["stored_kv_dtypes"][0] == "float8_e4m3fn"
    # the tiny model's head_dim 64: codes plus a float32 scale per row (0.516 at 128), and the same bookkeeping
    row_share = (64 + 4) / (2 * 64)
    assert fp8["kv_gib"] / bf16["kv_gib"] == pytest.approx(row_share, abs=0.01)
    assert fp8["kv_read_gib"] / bf16["kv_read_gib"] == pytest.approx(row_share, abs=1e-6)
    kv = next(t for t in report["targets"] if t["target"].startswith("KV <="))
    assert kv["kv_dtype"] == "float8_e4m3fn" and kv["measured"] == pytest.approx(fp8["kv_gib"] / bf16["kv_gib"])


def test_a_row_whose_cache_holds_another_dtype_is_an_error(bench, tmp_path, monkeypatch):
    """A press that takes the option but leaves the cache in bf16 is not measured as another dtype."""
    monkeypatch.setattr(bench, "kv_dtype_refusal", lambda kv_dtype: None)
    monkeypatch.setattr(bench, "press_options", lambda kv_dtype: {})
    bench.main([*TINY, "--cases", "1x64", "--methods", "adakv-snapkv", "--kv-dtypes", "float16", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("prefill_memory_*.json")
    (row,) = json.loads(json_file.read_text())["rows"]
    assert row["error"] == "asked for float16 keys and values, the cache held ['bfloat16']"
    assert "asked for float16" in (tmp_path / f"{json_file.stem}.md").read_text()
