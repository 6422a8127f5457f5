"""AdaptivePress(scope="model"): one budget for the whole model, allocated across layers and heads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_backends_agree, random_ids, tiny_model
from test_evict import run
from transformers import DynamicCache

from adakv import (
    AdaptivePress,
    CriticalKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
    kept_token_counts,
    prefill_in_chunks,
)
from adakv.cache import compressed_layers
from adakv.evaluation import engine
from adakv.models import attention_modules, is_full_attention_layer
from adakv.selection import kept_count

SEQ = 48
ALPHA = 0.2


def model_press(inner, backend="mask", alpha=ALPHA):
    return AdaptivePress(inner, alpha_safeguard=alpha, scope="model", backend=backend)


def compressed_context(model, press, ids):
    """Prefill `ids` under `press`; returns the cache (nothing appended after the context)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    return cache


def full_layers(model) -> list[int]:
    return [m.layer_idx for m in attention_modules(model) if is_full_attention_layer(m)]


def layer_budgets(model, inner, seq) -> dict[int, int]:
    """What the inner press alone keeps in each full-attention layer (all heads together)."""
    kv_heads = model.config.num_key_value_heads
    budgets = {}
    for module in attention_modules(model):
        if is_full_attention_layer(module):
            context = type("C", (), {"module": module, "layer_idx": module.layer_idx,
                                     "num_layers": model.config.num_hidden_layers})()
            ratio = inner.layer_compression_ratio(context)
            budgets[module.layer_idx] = kv_heads * int(kept_count(torch.tensor(seq), ratio))
    return budgets


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("inner", ["snapkv", "pyramidkv"])
def test_model_total_is_kept_exactly_and_the_safeguard_holds(family, backend, inner):
    model = tiny_model(family)
    scorer = (SnapKVPress(0.6, window_size=8) if inner == "snapkv" else PyramidKVPress(0.6, window_size=8, beta=4))
    cache = compressed_context(model, model_press(scorer, backend, alpha=0.5), random_ids(1, SEQ))
    counts = kept_token_counts(cache)
    assert sorted(counts) == full_layers(model)
    total = sum(int(c.sum()) for c in counts.values())
    expected = sum(layer_budgets(model, scorer, SEQ).values())
    assert total == expected
    heads = sum(c.shape[1] for c in counts.values())
    floor = int(0.5 * expected / heads)
    assert min(int(c.min()) for c in counts.values()) >= floor > 0


def sharpen_first_layer(model, scale_first=2000.0):
    """Layer 0 attends very sharply (scaled queries), the others uniformly (zero queries)."""
    with torch.no_grad():
        for module in attention_modules(model):
            module.q_proj.weight.mul_(scale_first if module.layer_idx == 0 else 0.0)


def test_budgets_move_across_layers_by_score():
    model = tiny_model("llama")
    sharpen_first_layer(model)
    scorer = SnapKVPress(0.5, window_size=4, kernel_size=1)
    ids = random_ids(1, SEQ)
    per_layer = {i: int(c.sum()) for i, c in kept_token_counts(compressed_context(model, AdaptivePress(scorer), ids)).items()}
    model_wide = {i: int(c.sum()) for i, c in kept_token_counts(compressed_context(model, model_press(scorer), ids)).items()}
    assert per_layer == layer_budgets(model, scorer, SEQ)  # scope="layer" keeps every layer's own budget
    assert sum(model_wide.values()) == sum(per_layer.values())
    # the sharp layer's few attended keys win, its near-zero tail loses to the uniform layers' 1/seq scores
    assert model_wide[0] < per_layer[0]
    assert model_wide[1] + model_wide[2] > per_layer[1] + per_layer[2]  # (their scores tie exactly)


@pytest.mark.parametrize("inner", ["snapkv", "tova", "pyramidkv"])
def test_evict_matches_mask(family, inner):
    model = tiny_model(family)
    make = {"snapkv": lambda: SnapKVPress(0.6, window_size=8), "tova": lambda: TOVAPress(0.5),
            "pyramidkv": lambda: PyramidKVPress(0.5, window_size=8)}[inner]
    mask_run = run(model, model_press(make(), "mask"), random_ids(1, SEQ))
    assert_backends_agree(mask_run, run(model, model_press(make(), "evict"), random_ids(1, SEQ)))


def test_generate_gives_the_same_tokens_with_both_backends_and_padding():
    model = tiny_model("qwen2")
    ids = random_ids(2, 40, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :7], attention_mask[1, :7] = 0, 0
    outputs = []
    for backend in ("mask", "evict"):
        with torch.no_grad(), model_press(SnapKVPress(0.5, window_size=8), backend)(model):
            out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=5, min_new_tokens=5,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        outputs.append(out)
        if backend == "mask":  # padding is never kept
            assert all(not layer.context_keep[1, :, :7].any() for layer in compressed_layers(out.past_key_values).values())
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)


@pytest.mark.parametrize("scorer", [
    lambda: KnormPress(0.5), lambda: KeyDiffPress(0.5), lambda: RandomPress(0.5), lambda: StreamingLLMPress(0.5),
    lambda: ExpectedAttentionPress(0.5), lambda: CriticalKVPress(SnapKVPress(0.5)),
])
def test_scores_that_are_not_probabilities_are_refused(scorer):
    with pytest.raises(ValueError, match="attention-probability scores"):
        model_press(scorer())
    AdaptivePress(scorer())  # scope="layer" compares scores of one layer only: allowed


def test_probability_scorers_are_accepted_and_bad_scope_refused():
    for inner in (SnapKVPress(0.5), TOVAPress(0.5), PyramidKVPress(0.5),
                  ExpectedAttentionPress(0.5, use_value_norm=False)):
        assert model_press(inner).compresses_after_prefill
    assert not AdaptivePress(SnapKVPress(0.5)).compresses_after_prefill
    with pytest.raises(ValueError, match="scope must be one of"):
        AdaptivePress(SnapKVPress(0.5), scope="layers")


def test_chunked_prefill_is_refused():
    model = tiny_model("llama")
    press = model_press(SnapKVPress(0.5, window_size=8))
    with press(model), pytest.raises(ValueError, match="whole context prefill"):
        prefill_in_chunks(model, press, random_ids(1, SEQ), chunk_size=16)


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_evaluation_fast_path_compresses_like_the_hooks(backend):
    model = tiny_model("gemma3")
    ids = random_ids(1, SEQ)
    press = model_press(SnapKVPress(0.7, window_size=8), backend)
    dense = engine.dense_prefill(model, ids)
    with press(model):
        fast = engine.compressed_cache(dense, press)
        hooked = engine.prefill(model, ids)
        fast_counts, hooked_counts = kept_token_counts(fast), kept_token_counts(hooked)
    assert fast_counts.keys() == hooked_counts.keys() == {2}
    for index in fast_counts:
        assert torch.equal(fast_counts[index], hooked_counts[index])
    assert compressed_layers(dense.cache) == {}  # the recorded dense cache is untouched


def test_ratio_zero_compresses_nothing():
    model = tiny_model("llama")
    cache = compressed_context(model, model_press(SnapKVPress(0.0)), random_ids(1, SEQ))
    assert compressed_layers(cache) == {}


def test_registry_names_and_report_pairing():
    import pandas as pd

    from adakv.evaluation.registry import build_press
    from adakv.evaluation.report import adaptive_vs_uniform

    press = build_press("adakv_model_snapkv", 0.5, backend="evict")
    assert isinstance(press, AdaptivePress) and press.scope == "model" and press.backend == "evict"
    rows = [dict(task="t", context_length=64, sample=0, ratio=0.5, press=name, score=score)
            for name, score in [("snapkv", 0.0), ("adakv_model_snapkv", 1.0)]]
    table = adaptive_vs_uniform(pd.DataFrame(rows)).set_index("adaptive")
    assert table.loc["adakv_model_snapkv", "uniform"] == "snapkv"
    assert table.loc["adakv_model_snapkv", "difference"] == 1.0


def test_decoder_hooks_are_removed_after_the_block_also_on_error():
    from test_presses import hook_snapshot

    model = tiny_model("llama")
    before = hook_snapshot(model)
    press = model_press(SnapKVPress(0.5, window_size=8))
    with press(model):
        assert model.get_decoder()._forward_hooks and hook_snapshot(model) != before
        with torch.no_grad():
            model(random_ids(1, 16), past_key_values=DynamicCache(config=model.config))
    assert hook_snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"), press(model):
        raise RuntimeError("boom")
    assert hook_snapshot(model) == before and not hasattr(press, "_prefill_parts")
