"""CriticalKVPress: the two-stage selection and CriticalAdaKV."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache

from adakv import AdaptivePress, SnapKVPress, kept_token_counts
from adakv.presses.wrappers.criticalkv import CriticalKVPress, projected_value_norms


def compress_once(model, press, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    return cache


def test_projected_value_norms_match_explicit_projection():
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    values = torch.randn(1, 2, 5, 16)

    class Context:
        pass

    context = Context()
    context.module, context.values = module, values
    norms = projected_value_norms(context, block=2)
    weight = module.o_proj.weight  # (hidden, heads * head_dim)
    for kv_head in range(2):
        expected = torch.stack(
            [(values[0, kv_head] @ weight[:, (kv_head * 2 + g) * 16 : (kv_head * 2 + g + 1) * 16].T).abs().sum(-1) for g in range(2)]
        ).mean(0)
        torch.testing.assert_close(norms[0, kv_head], expected)


def test_first_stage_keeps_the_inner_press_best_tokens():
    model = tiny_model("qwen2")
    ids = random_ids(1, 40)
    inner = SnapKVPress(0.5, window_size=4)
    press = CriticalKVPress(inner, first_stage_ratio=0.5)
    captured = {}

    def spy(context):
        captured["context"] = context
        return CriticalKVPress.compress(press, context)

    press.compress = spy
    compress_once(model, press, ids)
    context = captured["context"]
    keep = CriticalKVPress.compress(press, context)
    base = inner.score(context)
    best = base.topk(10, dim=-1).indices  # first stage: half of a 20-token budget
    assert keep.gather(-1, best).all()
    assert keep.sum(-1).eq(20).all()


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_critical_adakv_keeps_layer_budget(family):
    model = tiny_model(family)
    ids = random_ids(1, 40)
    cache = compress_once(model, AdaptivePress(CriticalKVPress(SnapKVPress(0.75, window_size=4))), ids)
    counts = kept_token_counts(cache)
    assert counts, "no layer was compressed"
    for per_head in counts.values():
        assert per_head.sum().item() == 2 * 10  # 2 heads x round(0.25 * 40)


def test_bad_first_stage_ratio_and_inner_press():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CriticalKVPress(SnapKVPress(0.5), first_stage_ratio=1.5)
    with pytest.raises(TypeError):
        CriticalKVPress(object())
