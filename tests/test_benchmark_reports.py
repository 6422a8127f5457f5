"""The committed benchmark tables are what their scripts write from the committed raw results (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_table_is_written_from_its_json(tmp_path):
    tune = load_benchmark("tune_decode_attention")
    result = json.loads((RESULTS / "tune_decode_attention_NVIDIA_H200.json").read_text())
    tune.write_table(tmp_path / "table.md", result)
    assert (tmp_path / "table.md").read_text() == (RESULTS / "tune_decode_attention_NVIDIA_H200.md").read_text()
    for case in result["cases"]:  # the best setting is the fastest one measured
        assert case["best"]["us"] == min(setting["us"] for setting in case["settings"])


def test_decode_limit_table_is_the_merge_of_its_runs(tmp_path):
    bench = load_benchmark("bench_decode_limit")
    merged = json.loads((RESULTS / "decode_limit_NVIDIA_H200.json").read_text())
    runs = [RESULTS / f"decode_limit_NVIDIA_H200_{tag}.json" for tag in ("b1", "b8", "b8b", "fused", "tuned", "gemv", "gemv_plan", "combine", "combine2", "combine2_b8")]
    bench.merge([str(path) for path in runs], tmp_path)
    again = json.loads((tmp_path / "decode_limit_NVIDIA_H200.json").read_text())
    assert again["rows"] == merged["rows"] and again["superseded_rows"] == merged["superseded_rows"]
    assert (tmp_path / "decode_limit_NVIDIA_H200.md").read_text() == (RESULTS / "decode_limit_NVIDIA_H200.md").read_text()
