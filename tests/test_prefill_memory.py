"""Peak memory of a compressed prefill: each layer's dense keys and values live only until that layer is
compressed, so `model.generate` under a layer-wise press peaks at the dense peak minus the KV it frees
(plus the flat layers' slack rows), with the speed switches on and off. Live bytes are counted on CPU by
benchmarks/live_bytes.py (a dispatch mode over every aten op), the GPU figure by
benchmarks/bench_peak_memory.py. The model has the Llama-3.1-8B proportions (GQA 4:1, head_dim = hidden /
heads, MLP 3.5x hidden), so its peak is made of the same parts in the same ratios as the 8B model's."""

from __future__ import annotations

import importlib.util
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import adakv
from adakv import presses as P
from adakv.cache.flat import FlatHeadwiseLayer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("live_bytes", ROOT / "benchmarks" / "live_bytes.py")
live_bytes = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("live_bytes", live_bytes)
_spec.loader.exec_module(live_bytes)

TOKENS, LAYERS = 1024, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=896, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def layer_kv_bytes(model) -> int:
    config = model.config
    return TOKENS * 2 * config.num_key_value_heads * config.head_dim * 2  # K and V, bf16


def peak_of_generate(model, press=None, **switches) -> tuple[int, DynamicCache, list]:
    """(peak live bytes of one generate call, its cache, its tokens) with `press` and the speed switches;
    fuse_elementwise runs kernels that hold memory as the Triton ones do (live_bytes.one_pass_kernels)."""
    from adakv.runtimes.hf.fusion.elementwise import fused_elementwise
    from adakv.runtimes.hf.fusion.joined_projections import joined_projections

    ids = torch.randint(3, 250, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), ExitStack() as stack:
        if switches.pop("join_projections", False):
            stack.enter_context(joined_projections(model))
        if switches.pop("fuse_elementwise", False):
            stack.enter_context(fused_elementwise(model, live_bytes.one_pass_kernels(block_rows=2)))
        if switches:
            stack.enter_context(adakv.accelerate(model, **switches))
        if press is not None:
            stack.enter_context(press(model))
        with live_bytes.LiveBytes(where_depth=0) as live:
            tokens = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    return live.peak, cache, tokens[0, TOKENS:].tolist()


@pytest.fixture(scope="module")
def dense(model):
    return peak_of_generate(model)


SWITCHES = {
    "none": {},
    "graphs": dict(cuda_graphs="emulate"),
    "graphs+joined": dict(cuda_graphs="emulate", join_projections=True),
    "graphs+joined+fused": dict(cuda_graphs="emulate", join_projections=True, fuse_elementwise=True),
}


@pytest.mark.parametrize("switches", sorted(SWITCHES))
def test_a_compressed_generate_peaks_at_dense_minus_the_freed_kv(model, dense, switches):
    dense_peak, dense_cache, _ = dense
    dense_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
    peak, cache, _ = peak_of_generate(model, P.AdaptivePress(P.SnapKVPress(0.75)), **dict(SWITCHES[switches]))
    flat = [layer for layer in cache.layers if isinstance(layer, FlatHeadwiseLayer)]
    assert len(flat) == LAYERS
    kept_kv = sum(layer.used_rows * layer.row_bytes for layer in flat)
    assert kept_kv <= 0.26 * dense_kv
    held = sum(layer.held_bytes() for layer in flat)  # kept rows + slack rows + lengths and offsets
    # the bound: dense's peak with the freed KV taken out and the flat layers' own slack put in. Slack of the
    # check: 5% of one layer's dense KV (the emulated kernels' row blocks; the generated tokens' rows)
    bound = dense_peak - dense_kv + held + 0.05 * layer_kv_bytes(model)
    unit = layer_kv_bytes(model)
    assert peak <= bound, (
        f"peak {peak / unit:.2f} x one layer's KV, bound {bound / unit:.2f} (dense {dense_peak / unit:.2f}, "
        f"dense KV {dense_kv / unit:.2f}, flat held {held / unit:.2f})"
    )


def test_model_scope_holds_only_the_window_rows_of_each_layers_inputs(model, dense):
    """AdaptivePress(scope="model") compresses after the whole prefill, so it holds every layer's dense KV until
    then, as dense does, and of each layer's input hidden states and cos/sin only the newest rows SnapKV reads
    (its window, copied). Bound: dense's peak + those rows + 5% of one layer's KV (the recorded contexts'
    availability masks, one bool per token and layer). Holding every row, as before, added 2 units per layer."""
    dense_peak = dense[0]
    press = P.AdaptivePress(P.SnapKVPress(0.75), scope="model")
    peak, cache, _ = peak_of_generate(model, press)
    assert len([layer for layer in cache.layers if isinstance(layer, FlatHeadwiseLayer)]) == LAYERS
    config, window = model.config, press.layer_input_rows
    assert window == 64
    rotary_dim = config.head_dim  # cos and sin, bf16 as the hidden states
    window_rows = LAYERS * window * (config.hidden_size + 2 * rotary_dim) * 2
    unit = layer_kv_bytes(model)
    bound = dense_peak + window_rows + 0.05 * unit
    assert peak <= bound, (
        f"peak {peak / unit:.2f} x one layer's KV, bound {bound / unit:.2f} (dense {dense_peak / unit:.2f}, "
        f"window rows {window_rows / unit:.2f})"
    )


def test_the_speed_switches_give_the_tokens_of_the_plain_run(model):
    press = P.AdaptivePress(P.SnapKVPress(0.75))
    _, _, plain = peak_of_generate(model, press)
    _, _, switched = peak_of_generate(model, press, cuda_graphs="emulate", join_projections=True)
    assert switched == plain


def test_peak_memory_benchmark_smoke(tmp_path):
    path = ROOT / "benchmarks" / "bench_peak_memory.py"
    spec = importlib.util.spec_from_file_location("bench_peak_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--layers", "2", "--cases", "1x256", "--new-tokens", "2", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("peak_memory_*.json")
    report = json.loads(json_file.read_text())
    assert (tmp_path / (json_file.stem + ".md")).exists()
    assert "adakv_commit" in report["meta"] and report["meta"]["command"] and report["meta"]["torch"] == torch.__version__
    dense, adakv_row = report["rows"]
    assert (dense["method"], adakv_row["method"]) == ("dense", "adakv")
    assert adakv_row["kv_gib"] < 0.5 * dense["kv_gib"] and adakv_row["peak_gib"] < dense["peak_gib"]
    assert adakv_row["held_margin_gib"] >= -0.05 * dense["kv_gib"] / 2  # within 5% of one layer's KV
    assert dense["leftover_gib"] == adakv_row["leftover_gib"] == 0
