"""Compression during decoding: DecodingPress, PrefillDecodingPress, and the cache methods they use
(MaskedLayer.restrict_to, FlatHeadwiseLayer.recompress)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import random_ids, tiny_model
from test_flat_cache import Config, assert_matches_oracle, random_layer_inputs
from transformers import DynamicCache

from adakv import (
    AdaptivePress,
    ChunkPress,
    DecodingPress,
    KnormPress,
    ObservedAttentionPress,
    PrefillDecodingPress,
    ScorerPress,
    SnapKVPress,
    kept_token_counts,
    rollback,
)
from adakv.cache import MaskedLayer, compressed_layers
from adakv.cache.flat import DEFAULT_MIN_SLACK, FlatHeadwiseLayer
from adakv.runtimes.hf.decoding import RecentInputs


# --- the cache methods -------------------------------------------------------------------------


def test_recompress_keeps_the_chosen_rows_and_continues_positions():
    keys, values, keep = random_layer_inputs(2, 3, 20, 8, seed=5)
    layer = FlatHeadwiseLayer(keys, values, keep, Config())
    new_keys, new_values = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    layer.update(new_keys, new_values)
    rows_k, rows_v = (rows[:, : layer.max_length] for rows in layer.dense_rows())  # (6 sequences, max_length, 8)
    generator = torch.Generator().manual_seed(1)
    second = torch.rand(2, 3, layer.max_length, generator=generator) < 0.5
    used = torch.arange(layer.max_length)[None] < layer.lengths[:, None]
    chosen = second.reshape(6, -1) & used
    expected = {s: (rows_k[s][chosen[s]], rows_v[s][chosen[s]]) for s in range(6)}

    layer.recompress(second, slack=10)
    assert layer.appended == 0 and layer.get_seq_length() == 26 and layer.context_length == 26
    assert layer.slack == 10 and layer.total_rows == int(chosen.sum()) + 6 * 10
    assert_matches_oracle(layer, expected)
    layer.update(new_keys[:, :, :2], new_values[:, :, :2])  # appends go behind the new context
    assert layer.kept_counts().flatten().tolist() == (chosen.sum(-1) + 2).tolist()
    with pytest.raises(ValueError, match="max_length"):
        layer.recompress(second[..., :-1])


def test_masked_layer_restrict_to_covers_the_appended_tokens():
    keys, values, keep = random_layer_inputs(1, 2, 10, 4)
    layer = MaskedLayer(keys, values, keep, Config())
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    wanted = torch.rand(1, 2, 13) < 0.5
    layer.restrict_to(wanted)
    assert layer.context_length == 13
    assert torch.equal(layer.context_keep, wanted & torch.cat([keep, torch.ones(1, 2, 3, dtype=torch.bool)], -1))
    with pytest.raises(ValueError, match="seq_length"):
        layer.restrict_to(wanted[..., :5])


def test_recent_inputs_hold_the_last_tokens():
    hidden = torch.randn(2, 20, 6)
    cos, sin = torch.randn(1, 20, 4), torch.randn(1, 20, 4)  # batch 1: broadcast over the batch
    recent = RecentInputs()
    recent.add(hidden[:, :10], (cos[:, :10], sin[:, :10]), limit=4)
    for step in range(10, 20):
        recent.add(hidden[:, step : step + 1], (cos[:, step : step + 1], sin[:, step : step + 1]), limit=4)
        if step in (11, 19):
            last_hidden, last_cos, last_sin = recent.last(4)
            assert torch.equal(last_hidden, hidden[:, step - 3 : step + 1])
            assert torch.equal(last_cos, cos[:, step - 3 : step + 1].expand(2, 4, 4))
            assert torch.equal(last_sin, sin[:, step - 3 : step + 1].expand(2, 4, 4))
    assert sum(piece[0].shape[1] for piece in recent.pieces) <= 4


# --- DecodingPress end to end ------------------------------------------------------------------


def greedy_steps(model, press, ids, steps, attention_mask=None, on_step=None):
    """Prefill `ids`, then `steps` greedy decode steps inside `press`. Returns every forward's last logits
    and the cache; on_step(cache, step) runs after each decode step."""
    cache = DynamicCache(config=model.config)
    logits, mask = [], attention_mask
    with torch.no_grad(), press(model):
        out = model(ids, attention_mask=mask, past_key_values=cache)
        for step in range(steps):
            logits.append(out.logits[:, -1])
            next_ids = out.logits[:, -1:].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            out = model(next_ids, attention_mask=mask, past_key_values=cache)
            if on_step is not None:
                on_step(cache, step + 1)
    logits.append(out.logits[:, -1])
    return logits, cache


def layer_bytes(layer) -> int:
    if isinstance(layer, FlatHeadwiseLayer):
        return layer.held_bytes()
    return layer.keys.nbytes + layer.values.nbytes


@pytest.mark.parametrize("adaptive", [False, True])
def test_evict_memory_stays_bounded_over_a_long_generation(adaptive):
    model = tiny_model("llama")
    interval, target, steps, prompt = 16, 32, 200, 48
    scorer = SnapKVPress(window_size=8)
    press = DecodingPress(AdaptivePress(scorer) if adaptive else scorer, compression_interval=interval,
                          target_size=target, backend="evict")  # fmt: skip
    held, lengths = [], []

    def measure(cache, step):
        held.append(sum(layer_bytes(layer) for layer in cache.layers))
        lengths.append(cache.get_seq_length())
        counts = kept_token_counts(cache)
        if step >= interval:  # every layer compressed at least once
            assert len(counts) == 3
            since = step % interval
            for per_head in counts.values():
                assert per_head.sum().item() == 2 * (target + since)
                if not adaptive:
                    assert per_head.flatten().tolist() == [target + since] * 2

    greedy_steps(model, press, random_ids(1, prompt), steps, on_step=measure)
    assert lengths == list(range(prompt + 1, prompt + steps + 1))  # positions go on as if dense
    layers, heads, head_dim, row = 3, 2, 16, 2 * 16 * 4  # K+V bytes of one token of one head, fp32
    metadata = 4 * 8 * heads  # four int64 tensors per sequence
    bound = layers * (heads * (target + max(interval, DEFAULT_MIN_SLACK)) * row + metadata)
    assert max(held[interval - 1 :]) <= bound
    dense_end = layers * heads * (prompt + steps) * row
    assert bound < dense_end / 2  # without compression the cache would have grown past the bound
    assert held[-1] <= bound and held[-1] == held[-1 - interval]  # the steady state repeats


def test_evict_matches_mask_during_decoding(family):
    model = tiny_model(family)
    ids = random_ids(2, 40, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :9], attention_mask[1, :9] = 0, 0
    runs = {}
    for backend in ("mask", "evict"):
        # pooling (kernel_size 1) off: with it, neighbours differ between the dense and the compacted view
        inner = AdaptivePress(SnapKVPress(window_size=4, kernel_size=1))
        press = DecodingPress(inner, compression_interval=8, target_size=12, hidden_states_buffer_size=8, backend=backend)
        runs[backend] = greedy_steps(model, press, ids, 30, attention_mask)
    (mask_logits, mask_cache), (evict_logits, evict_cache) = runs["mask"], runs["evict"]
    for step, (expected, actual) in enumerate(zip(mask_logits, evict_logits)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward {step}: {m}")
    assert all(isinstance(layer, FlatHeadwiseLayer) for layer in compressed_layers(evict_cache).values())
    mask_counts, evict_counts = kept_token_counts(mask_cache), kept_token_counts(evict_cache)
    assert mask_counts.keys() == evict_counts.keys() and mask_counts
    for index in mask_counts:
        assert torch.equal(mask_counts[index], evict_counts[index])
        assert (mask_counts[index].sum(-1) == 2 * 12 + 30 % 8 * 2).all()


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_prefill_decoding_press_compresses_the_context_then_the_generation(backend):
    model = tiny_model("qwen2")
    decoding = DecodingPress(KnormPress(), compression_interval=8, target_size=16, backend=backend)
    press = PrefillDecodingPress(SnapKVPress(compression_ratio=0.5, window_size=8), decoding, backend=backend)
    assert press.compression_ratio == 0.5
    counts = []
    greedy_steps(model, press, random_ids(1, 48), 20, on_step=lambda cache, step: counts.append(
        kept_token_counts(cache)[1][0, 0].item()))  # fmt: skip
    # 24 kept after the prefill, one more per step, down to 16 every 8 steps
    assert counts == [25, 26, 27, 28, 29, 30, 31, 16, 17, 18, 19, 20, 21, 22, 23, 16, 17, 18, 19, 20]


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_prefill_decoding_press_with_a_model_wide_prefill_press(backend):
    """The context compressed model-wide (after the whole prefill, every layer ranked together), then the
    generation: until the decoding press's first re-compression the tokens are the model-wide press's alone."""
    model = tiny_model("llama")
    ids = random_ids(1, 48)
    model_wide = AdaptivePress(SnapKVPress(compression_ratio=0.5, window_size=8), scope="model", backend=backend)
    decoding = DecodingPress(KnormPress(), compression_interval=8, target_size=16, backend=backend)
    both = PrefillDecodingPress(model_wide, decoding)
    assert both.compresses_after_prefill
    logits = {}
    for name, press in (("alone", model_wide), ("both", both)):
        logits[name], cache = greedy_steps(model, press, ids, 12)
        kept = sum(int(counts.sum()) for counts in kept_token_counts(cache).values())
        assert kept < 2 * 4 * (48 + 12), name  # 2 layers x 4 KV heads: the context was compressed
    for step in range(8):  # the decoding press first re-compresses after 8 appended tokens
        torch.testing.assert_close(logits["both"][step], logits["alone"][step], rtol=1e-5, atol=1e-5)


def test_decoding_press_works_inside_generate():
    model = tiny_model("mistral")
    ids = random_ids(1, 48)
    press = DecodingPress(AdaptivePress(SnapKVPress(window_size=8)), compression_interval=10, target_size=20,
                          backend="evict")  # fmt: skip
    with torch.no_grad(), press(model):
        out = model.generate(ids, max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)  # fmt: skip
    assert out.sequences.shape == (1, 48 + 25)
    for per_head in kept_token_counts(out.past_key_values).values():
        assert per_head.sum().item() == 2 * 20 + 2 * 4  # compressed after 20 appended tokens, then 4 more


@dataclass
class UndeclaredScorer(ScorerPress):
    """A scorer of one's own: with `reads` None it does not say how many newest positions' inputs it reads."""

    reads: int | None = None

    @property
    def hidden_states_rows(self) -> int | None:
        return self.reads if self.reads is not None else super().hidden_states_rows

    def score(self, context):
        return context.keys.norm(dim=-1)


def test_decoding_press_refuses_bad_settings():
    with pytest.raises(ValueError, match="compression_interval"):
        DecodingPress(KnormPress(), compression_interval=0)
    with pytest.raises(ValueError, match="target_size"):
        DecodingPress(KnormPress(), target_size=-3)
    with pytest.raises(ValueError, match="query window"):
        DecodingPress(SnapKVPress(window_size=64), hidden_states_buffer_size=32)
    with pytest.raises(ValueError, match="hidden_states_rows = n"):  # a press of one's own, silent on what it reads
        DecodingPress(UndeclaredScorer())
    assert DecodingPress(UndeclaredScorer(reads=8)).press.layer_input_rows == 8
    with pytest.raises(TypeError, match="scoring press"):
        DecodingPress(ChunkPress(KnormPress()))
    with pytest.raises(TypeError, match="attention weights"):
        DecodingPress(AdaptivePress(ObservedAttentionPress()))
    with pytest.raises(ValueError, match="conflicting backends"):
        PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), backend="mask"), backend="evict")
    with pytest.raises(TypeError, match="DecodingPress"):
        PrefillDecodingPress(KnormPress(0.5), KnormPress())


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_rollback_into_a_generation_compressed_while_decoding_is_refused(backend):
    model = tiny_model("llama")
    press = DecodingPress(KnormPress(), compression_interval=4, target_size=10, backend=backend)
    _, cache = greedy_steps(model, press, random_ids(1, 24), 6)
    with pytest.raises(ValueError, match="compressed context"):
        rollback(cache, 24)
    rollback(cache, 29)  # the tokens after the last compression can still go
    assert cache.get_seq_length() == 29
