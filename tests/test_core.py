"""Core machinery: hooks, attention switching, masked attention, keep-mask selection."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from adakv import AdaptivePress, SnapKVPress, kept_token_counts
from adakv.cache import MaskedLayer, rollback
from adakv.selection import adaptive_keep_mask, kept_count, uniform_keep_mask


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def prefill(model, ids, press=None):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is None:
            logits = model(ids, past_key_values=cache).logits
        else:
            with press(model):
                logits = model(ids, past_key_values=cache).logits
    return cache, logits


# ---------------------------------------------------------------- hooks and attention switching


def test_hooks_removed_and_implementation_restored_on_exit():
    model = tiny_model("llama")
    before = count_hooks(model)
    with SnapKVPress(0.5)(model):
        assert count_hooks(model) > before
        assert model.config._attn_implementation == "adakv_sdpa"
    assert count_hooks(model) == before
    assert model.config._attn_implementation == "sdpa"


def test_hooks_removed_when_body_raises():
    model = tiny_model("qwen2", attn_implementation="eager")
    before = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with AdaptivePress(SnapKVPress(0.5))(model):
            raise RuntimeError("boom")
    assert count_hooks(model) == before
    assert model.config._attn_implementation == "eager"


def test_presses_do_not_nest():
    model = tiny_model()
    with SnapKVPress(0.5)(model):
        with pytest.raises(RuntimeError, match="do not nest"):
            with SnapKVPress(0.5)(model):
                pass
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_names_supported_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Supported families: Llama"):
        with SnapKVPress(0.5)(model):
            pass


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'sdpa', 'eager'"):
        with SnapKVPress(0.5)(model):
            pass


def test_only_the_context_prefill_is_compressed():
    model = tiny_model()
    ids = random_ids(1, 40)
    press = SnapKVPress(0.5, window_size=8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        kept_after_prefill = kept_token_counts(cache)
        model(random_ids(1, 6, seed=3), past_key_values=cache)  # a question: appended, not compressed
        model(random_ids(1, 1, seed=4), past_key_values=cache)  # a decode step
    for layer, counts in kept_token_counts(cache).items():
        assert torch.equal(counts, kept_after_prefill[layer] + 7)
        assert torch.equal(kept_after_prefill[layer], torch.full_like(counts, 20))


def test_compressed_cache_refuses_plain_attention_after_the_block():
    model = tiny_model()
    ids = random_ids(1, 40)
    cache, _ = prefill(model, ids, SnapKVPress(0.5))
    with pytest.raises(RuntimeError, match="inside a `with press"), torch.no_grad():
        model(random_ids(1, 1), past_key_values=cache)


# ---------------------------------------------------------------- masked attention == gathered cache


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_masked_attention_equals_physically_gathered_cache(family, attn_implementation):
    """A uniform press keeps the same number of tokens per head, so its masked cache can be gathered
    into a smaller dense cache that plain attention reads; both must give the same logits."""
    model = tiny_model(family, attn_implementation)
    ids = random_ids(1, 48)
    press = SnapKVPress(0.6, window_size=8, backend="mask")
    masked_cache, _ = prefill(model, ids, press)
    next_ids = random_ids(1, 3, seed=7)
    positions = torch.arange(48, 51)[None]
    with torch.no_grad(), press(model):
        masked_logits = model(next_ids, past_key_values=masked_cache, position_ids=positions).logits

    gathered = DynamicCache(config=model.config)
    for index, layer in enumerate(masked_cache.layers):
        keys, values = layer.keys[..., :48, :], layer.values[..., :48, :]
        if isinstance(layer, MaskedLayer):
            batch, heads, _ = layer.context_keep.shape
            order = layer.context_keep.nonzero()[:, -1].view(batch, heads, -1)  # ascending positions per head
            index_rows = order[..., None].expand(-1, -1, -1, keys.shape[-1])
            keys, values = keys.gather(2, index_rows), values.gather(2, index_rows)
        gathered.update(keys, values, index)
    with torch.no_grad():
        gathered_logits = model(next_ids, past_key_values=gathered, position_ids=positions).logits
    torch.testing.assert_close(masked_logits, gathered_logits, rtol=1e-5, atol=1e-5)


def test_masking_changes_the_output():
    """Guard against a mask that is silently ignored."""
    model = tiny_model()
    ids = random_ids(1, 48)
    press = SnapKVPress(0.75, window_size=4, backend="mask")
    dense_cache, _ = prefill(model, ids)
    masked_cache, _ = prefill(model, ids, press)
    with torch.no_grad():
        dense = model(ids[:, :1], past_key_values=dense_cache).logits
        with press(model):
            masked = model(ids[:, :1], past_key_values=masked_cache).logits
    assert (dense - masked).abs().max() > 1e-3


def test_rollback_keeps_context_and_refuses_to_cut_into_it():
    model = tiny_model()
    ids = random_ids(1, 40)
    press = SnapKVPress(0.5)
    cache, _ = prefill(model, ids, press)
    with torch.no_grad(), press(model):
        model(random_ids(1, 5), past_key_values=cache)
    assert cache.get_seq_length() == 45
    rollback(cache, 40)
    assert cache.get_seq_length() == 40
    with pytest.raises(ValueError, match="compressed context holds 40"):
        rollback(cache, 39)


# ---------------------------------------------------------------- selection


def test_kept_count_rounds_and_keeps_at_least_one():
    assert kept_count(torch.tensor([10, 3, 1, 0]), 0.75).tolist() == [2, 1, 1, 0]


def test_uniform_selection_keeps_top_scores_per_head_and_skips_unavailable():
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]])
    available = torch.tensor([[[False, True, True, True], [True, True, True, True]]])
    keep = uniform_keep_mask(scores, available, 0.5)
    assert keep.tolist() == [[[False, True, True, False], [False, False, True, True]]]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adaptive_selection_keeps_layer_budget_and_head_floor(alpha):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 4, 50, generator=generator)
    scores[:, 0] += 1.0  # head 0 would take everything without the safeguard
    available = torch.ones(2, 4, 50, dtype=torch.bool)
    ratio = 0.8
    keep = adaptive_keep_mask(scores, available, ratio, alpha)
    per_head = keep.sum(-1)
    assert per_head.sum(-1).tolist() == [40, 40]  # = uniform total: 4 heads x round(0.2 * 50)
    assert per_head.min() >= int(alpha * 10)
    # The first alpha * 10 picks of each head are its own best scores.
    if alpha > 0:
        floor = int(alpha * 10)
        best = scores.topk(floor, dim=-1).indices
        assert keep.gather(-1, best).all()


def test_adaptive_selection_moves_budget_towards_concentrated_scores():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, :15] = 1.0  # head 0 has many important tokens
    scores[0, 1, :2] = 1.0  # head 1 has few
    keep = adaptive_keep_mask(scores, torch.ones_like(scores, dtype=torch.bool), 0.5, 0.2)
    assert keep[0, 0].sum() > keep[0, 1].sum()
    assert keep.sum() == 20


def test_adaptive_press_invariants_on_a_model():
    model = tiny_model("mistral")
    ids = random_ids(2, 40)
    cache, _ = prefill(model, ids, AdaptivePress(SnapKVPress(0.7, window_size=8), alpha_safeguard=0.3))
    for counts in kept_token_counts(cache).values():
        assert counts.sum(-1).tolist() == [24, 24]  # 2 heads x round(0.3 * 40)
        assert counts.min() >= int(0.3 * 12)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_bad_compression_ratio(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SnapKVPress(compression_ratio=ratio)


@pytest.mark.parametrize("alpha", [-0.01, 1.01])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AdaptivePress(SnapKVPress(0.5), alpha_safeguard=alpha)


def test_adaptive_press_needs_a_press():
    with pytest.raises(TypeError, match="wraps a press"):
        AdaptivePress("snapkv")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        SnapKVPress(0.5, backend="gpu")


def test_adaptive_ratio_setter_validates():
    press = AdaptivePress(SnapKVPress(0.5))
    press.compression_ratio = 0.25
    assert press.press.compression_ratio == 0.25
    with pytest.raises(ValueError):
        press.compression_ratio = 1.0


def test_rollback_refuses_a_slid_window_layer_and_restore_brings_it_back():
    from adakv.cache import checkpoint, restore

    model = tiny_model("gemma3")  # layers 0 and 1 slide over 8 tokens
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_ids(1, 20), past_key_values=cache)
        saved = checkpoint(cache)
        before = [layer.keys.clone() for layer in cache.layers]
        model(random_ids(1, 4, seed=5), past_key_values=cache)
    with pytest.raises(ValueError, match="sliding-window layer"):
        rollback(cache, 20)
    restore(cache, saved)
    assert cache.get_seq_length() == 20
    assert all(torch.equal(layer.keys, keys) for layer, keys in zip(cache.layers, before))


def test_a_model_with_only_sliding_window_layers_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import COMMON

    model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16))
    with pytest.raises(ValueError, match="sliding window"):
        with SnapKVPress(0.5)(model):
            pass
