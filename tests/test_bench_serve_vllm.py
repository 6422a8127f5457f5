"""benchmarks/bench_serve_vllm.py without vLLM: how rows merge across calls and what the table shows."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve_vllm as bench  # noqa: E402


def row(measure, method, batch, ratio, mode, ms, **extra):
    return dict(
        measure=measure, method=method, batch=batch, context=32768, ratio=ratio, cudagraph_mode=mode,
        tokens_per_s=batch * 1000 / ms, max_running=batch, decode_ms=ms, ttft_p50_s=1.0, ttft_p95_s=2.0,
        adakv_commit="0123456789", **extra,
    )  # fmt: skip


def test_rows_of_another_graph_mode_or_measure_are_kept_and_the_same_row_is_replaced(tmp_path):
    path = tmp_path / "serve.json"
    bench.merge(path, [row("batch1", "vllm-dense", 1, 0.0, "FULL_AND_PIECEWISE", 6.0)], {"gpu": "X"}, "dense")
    bench.merge(path, [row("batch1", "adakv-vllm-adakv_snapkv", 1, 0.75, "PIECEWISE", 13.0)], {}, "adakv")
    bench.merge(path, [row("decode", "adakv-vllm-adakv_snapkv", 1, 0.75, "PIECEWISE", 5.0)], {}, "adakv")
    data = bench.merge(path, [row("batch1", "adakv-vllm-adakv_snapkv", 1, 0.75, "PIECEWISE", 12.0)], {}, "adakv")
    data = bench.merge(
        path, [row("batch1", "adakv-vllm-adakv_snapkv", 1, 0.75, "FULL_AND_PIECEWISE", 7.0, note="a timing")], {}, "adakv"
    )
    assert sorted((r["measure"], r["cudagraph_mode"], r["decode_ms"]) for r in data["rows"]) == [
        ("batch1", "FULL_AND_PIECEWISE", 6.0), ("batch1", "FULL_AND_PIECEWISE", 7.0), ("batch1", "PIECEWISE", 12.0),
        ("decode", "PIECEWISE", 5.0),
    ]  # fmt: skip
    assert json.loads(path.read_text()) == data
    table = bench.render(data)
    assert "| batch1 | adakv-vllm-adakv_snapkv | 1 | 32768 | 0.75 | 83 | 1 | 12.00 |" in table
    assert "| 0.50x | PIECEWISE | 0123456 |" in table  # against dense's batch-1 row of the same context
    assert "| decode | adakv-vllm-adakv_snapkv | 1 | 32768 | 0.75 | 200 | 1 | 5.00 | 1.00 | 2.00 | — |" in table
    assert "FULL_AND_PIECEWISE: a timing" in table


def test_every_run_keeps_its_provenance_and_a_rewrite_of_the_same_run_adds_none(tmp_path):
    path = tmp_path / "serve.json"
    first = {"date": "d1", "command": "c dense", "adakv_commit": "aaaaaaaaa"}
    second = {"date": "d2", "command": "c dense again", "adakv_commit": "bbbbbbbbb"}
    bench.merge(path, [row("batch1", "vllm-dense", 1, 0.0, "FULL_AND_PIECEWISE", 6.0)], first, "dense")
    bench.merge(path, [row("decode", "vllm-dense", 24, 0.0, "FULL_AND_PIECEWISE", 30.0)], second, "dense")
    data = bench.merge(path, [row("decode", "vllm-dense", 8, 0.0, "FULL_AND_PIECEWISE", 20.0)], second, "dense")
    assert data["meta"]["dense"] == second and data["runs"] == [first, second]
    table = bench.render(data)
    assert "- d1, adakv aaaaaaa: `c dense`" in table and "- d2, adakv bbbbbbb: `c dense again`" in table


def test_most_at_once_counts_overlapping_intervals():
    assert bench.most_at_once([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == 2
    assert bench.most_at_once([(0, 10), (1, 2), (3, 4), (1.5, 3.5)]) == 3


def test_saturation_figures_from_the_requests_timestamps(monkeypatch):
    """Three requests (scheduled, first token, last token of 3): at most 2 run at once; ms per token is
    the mean of (last - first) / 2."""
    from types import SimpleNamespace as Of

    outputs = [
        Of(metrics=Of(first_token_latency=ttft, scheduled_ts=start, first_token_ts=start + 0.5, last_token_ts=end,
                      num_generation_tokens=3), outputs=[Of(token_ids=[1, 2, 3])])
        for ttft, start, end in [(1.0, 0.0, 2.5), (2.0, 1.0, 3.5), (3.0, 2.75, 4.25)]
    ]  # fmt: skip
    monkeypatch.setattr(bench, "params", lambda count, ratio: count)
    llm = Of(generate=lambda prompts, params, use_tqdm: outputs)
    row = bench.saturation(llm, "vllm-dense", None, requests=3, context=8, new_tokens=3)
    assert row["max_running"] == 2 and (row["ttft_p50_s"], row["ttft_p95_s"]) == (2.0, 3.0)
    assert row["decode_ms"] == pytest.approx(1000 * (1.0 + 1.0 + 0.5) / 3)
    assert row["measure"] == "saturation" and row["tokens_per_s"] > 0
