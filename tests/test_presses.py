"""The press matrix (scorers x wrappers x model families) and press-specific behaviour, on tiny models."""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

from adakv import (
    AdaptivePress,
    BlockPress,
    ChunkKVPress,
    ChunkPress,
    ComposedPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    LagKVPress,
    ObservedAttentionPress,
    PerLayerCompressionPress,
    PyramidKVPress,
    RandomPress,
    SimLayerKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
    kept_token_counts,
)
from adakv import CriticalKVPress, DecodingPress, RecordingPress
from adakv import CURPress, DuoAttentionPress, FinchPress, HeadKVPress, MergePress, ThinKPress
from adakv.cache import compressed_layers
from adakv.models import attention_modules, is_full_attention_layer, pre_rope_queries, rope_cos_sin
from adakv.presses.scorers.expected_attention import future_rope
from adakv.presses.scorers.pyramidkv import pyramid_keep_fraction
from adakv.presses.scorers.snapkv import mean_window_attention

from conftest import COMMON, random_ids, tiny_model

SEQ = 48
RATIO = 0.5
NUM_LAYERS = COMMON["num_hidden_layers"]
CHUNK = 16
FIRST_RATIO = 0.25  # ComposedPress: a KnormPress at this ratio runs first
LAYER_RATIOS = [0.25, 0.5, 0.75]  # PerLayerCompressionPress

SCORERS = {
    "snapkv": lambda r: SnapKVPress(compression_ratio=r, window_size=8),
    "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r, window_size=8),
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r),
    "random": lambda r: RandomPress(compression_ratio=r, seed=0),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "observed_attention": lambda r: ObservedAttentionPress(compression_ratio=r),
    "expected_attention": lambda r: ExpectedAttentionPress(compression_ratio=r, n_future_positions=16, n_recent=16),
    "keydiff": lambda r: KeyDiffPress(compression_ratio=r),
    "lagkv": lambda r: LagKVPress(compression_ratio=r, n_sink=2, lag_size=8),
    "simlayerkv": lambda r: SimLayerKVPress(compression_ratio=r, lazy_threshold=0.0),  # every layer lazy
    "cur": lambda r: CURPress(compression_ratio=r, rank=4),
    "finch": lambda r: FinchPress(compression_ratio=r, window_size=8, chunk_length=10),
    "duo_attention": lambda r: DuoAttentionPress(compression_ratio=r, n_sink=2, n_recent=4, window_size=8),
}

WRAPPERS = {
    "none": lambda press, r: press,
    "adaptive": lambda press, r: AdaptivePress(press),
    "chunk": lambda press, r: ChunkPress(press, chunk_length=CHUNK),
    "composed": lambda press, r: ComposedPress([KnormPress(compression_ratio=FIRST_RATIO * (r > 0)), press]),
    "per_layer": lambda press, r: PerLayerCompressionPress(press, [ratio * (r > 0) for ratio in LAYER_RATIOS]),
    "key_rerotation": lambda press, r: KeyRerotationPress(press),
    "critical": lambda press, r: CriticalKVPress(press),
    "chunkkv": lambda press, r: ChunkKVPress(press, chunk_length=5),
    "block": lambda press, r: BlockPress(press, block_size=CHUNK),
    "headkv": lambda press, r: HeadKVPress(press, window_size=8),
    "think": lambda press, r: ThinKPress(press, key_channel_compression_ratio=0.5 * (r > 0), window_size=8),
    "merge": lambda press, r: MergePress(press, window_size=8),
}

# Presses that give heads different lengths (the layer keeps the uniform total): these wrappers, these
# scorers' own compress, and the wrappers that keep the inner press's own compress.
HEADWISE_WRAPPERS = {"adaptive", "headkv"}
HEADWISE_SCORERS = {"duo_attention"}
COMPRESS_FORWARDING_WRAPPERS = {"none", "chunk", "composed", "key_rerotation", "think", "merge"}


def allocates_across_heads(scorer: str, wrapper: str) -> bool:
    return wrapper in HEADWISE_WRAPPERS or (scorer in HEADWISE_SCORERS and wrapper in COMPRESS_FORWARDING_WRAPPERS)


def attention_for(scorer: str) -> str:
    return "eager" if scorer == "observed_attention" else "sdpa"


@lru_cache(maxsize=None)
def cached_model(family: str, attn_implementation: str = "sdpa"):
    """Models are only read by the tests (a press restores everything it changes), so share them."""
    return tiny_model(family, attn_implementation)


def expected_kept(available: int, ratio: float) -> int:
    return max(1, round(available * (1 - ratio)))


def fake_context(model, layer_idx: int) -> SimpleNamespace:
    """Enough of a PrefillContext to ask a press for a layer's compression ratio."""
    return SimpleNamespace(
        module=attention_modules(model)[layer_idx], layer_idx=layer_idx, num_layers=model.config.num_hidden_layers
    )


def full_layer_indices(model) -> list[int]:
    return [module.layer_idx for module in attention_modules(model) if is_full_attention_layer(module)]


def greedy(model, ids, attention_mask=None, max_new_tokens=3):
    attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )


def context_counts(cache) -> dict[int, torch.Tensor]:
    """Kept context tokens per compressed layer: (batch, kv_heads), without the appended tokens.
    Either backend: presses without a backend evict (FlatHeadwiseLayer), backend="mask" gives MaskedLayer."""
    return {
        index: layer.context_keep.sum(-1) if layer.backend == "mask" else layer.context_kept.view(layer.batch_size, -1)
        for index, layer in compressed_layers(cache).items()
    }


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_matrix_generates_and_keeps_the_budget(family, scorer, wrapper):
    model = cached_model(family, attention_for(scorer))
    inner = SCORERS[scorer](RATIO)
    press = WRAPPERS[wrapper](inner, RATIO)
    ids = random_ids(seq_len=SEQ)
    with press(model):
        out = greedy(model, ids)
    assert out.sequences.shape == (1, SEQ + 3)

    counts = context_counts(out.past_key_values)
    assert sorted(counts) == full_layer_indices(model)
    for layer, per_head in counts.items():
        ratio = inner.layer_compression_ratio(fake_context(model, layer))
        if wrapper == "adaptive":
            uniform = expected_kept(SEQ, ratio)
            assert per_head.sum().item() == uniform * per_head.shape[-1]
            assert per_head.min().item() >= int(press.alpha_safeguard * uniform)
            continue
        if wrapper == "chunk":
            expected = sum(expected_kept(min(CHUNK, SEQ - start), ratio) for start in range(0, SEQ, CHUNK))
        elif wrapper == "composed":
            expected = expected_kept(expected_kept(SEQ, FIRST_RATIO), ratio)
        elif wrapper == "per_layer":
            expected = expected_kept(SEQ, LAYER_RATIOS[layer])
        else:
            expected = expected_kept(SEQ, ratio)
        if allocates_across_heads(scorer, wrapper):
            assert per_head.sum().item() == expected * per_head.shape[-1], f"layer {layer}"
        else:
            assert per_head.tolist() == [[expected] * per_head.shape[-1]], f"layer {layer}"
    # every (batch, head) total = kept context + the appended decode tokens
    appended = {i: out.past_key_values.layers[i].get_seq_length() - SEQ for i in counts}
    for layer, total in kept_token_counts(out.past_key_values).items():
        assert torch.equal(total, counts[layer] + appended[layer])


DECODING_TARGET = 20


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_matrix_decoding_press_keeps_the_target(family, scorer, adaptive):
    """Every scorer (alone or in AdaptivePress) inside DecodingPress: the cache is compressed at the second
    generated step to DECODING_TARGET tokens per head (on average with AdaptivePress), then grows by one."""
    inner = SCORERS[scorer](0.0)
    inner = AdaptivePress(inner) if adaptive else inner
    if scorer == "observed_attention":
        with pytest.raises(TypeError, match="attention weights"):
            DecodingPress(inner)
        return
    model = cached_model(family)
    press = DecodingPress(inner, compression_interval=2, target_size=DECODING_TARGET)
    with press(model):
        out = greedy(model, random_ids(seq_len=SEQ), max_new_tokens=4)  # 3 tokens fed back: compressed after 2
    counts = kept_token_counts(out.past_key_values)
    assert sorted(counts) == full_layer_indices(model)
    for per_head in counts.values():
        if adaptive:
            assert per_head.sum().item() == (DECODING_TARGET + 1) * per_head.shape[-1]
        else:
            assert per_head.tolist() == [[DECODING_TARGET + 1] * per_head.shape[-1]]


# At ratio 0 no scorer runs, so every scorer alone and every wrapper around one scorer cover it.
RATIO_ZERO_CASES = [(scorer, "none") for scorer in sorted(SCORERS)] + [
    ("snapkv", wrapper) for wrapper in sorted(WRAPPERS) if wrapper != "none"
]


@pytest.mark.parametrize("scorer, wrapper", RATIO_ZERO_CASES)
def test_ratio_zero_gives_the_unpressed_output(family, scorer, wrapper):
    model = cached_model(family, attention_for(scorer))
    press = WRAPPERS[wrapper](SCORERS[scorer](0.0), 0.0)
    assert press.compression_ratio == 0
    ids = random_ids(seq_len=SEQ, seed=2)
    reference = greedy(model, ids, max_new_tokens=4).sequences
    with press(model):
        out = greedy(model, ids, max_new_tokens=4)
    assert torch.equal(out.sequences, reference)
    assert compressed_layers(out.past_key_values) == {}


def hook_snapshot(model) -> list:
    return [
        (list(module._forward_hooks), list(module._forward_pre_hooks), hasattr(module, "adakv_cache"))
        for module in model.modules()
    ] + [model.config._attn_implementation]


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_hooks_are_removed_after_the_block_also_on_error(family, wrapper):
    model = cached_model(family)
    before = hook_snapshot(model)
    assert before[-1] == "sdpa"
    press = WRAPPERS[wrapper](KnormPress(compression_ratio=RATIO), RATIO)
    with press(model):
        greedy(model, random_ids(seq_len=16), max_new_tokens=1)
        assert hook_snapshot(model) != before
    assert hook_snapshot(model) == before

    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            raise RuntimeError("boom")
    assert hook_snapshot(model) == before


@pytest.mark.parametrize("wrapper", ["none", "adaptive", "chunk", "key_rerotation"])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_left_padding_is_never_kept(scorer, wrapper):
    model = cached_model("llama", attention_for(scorer))
    pad = 10
    ids = random_ids(batch=2, seq_len=SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    ids[0, :pad] = 0
    press = WRAPPERS[wrapper](SCORERS[scorer](RATIO), RATIO)
    press.backend = "mask"  # the test reads which positions each head kept (MaskedLayer.context_keep)
    with press(model):
        out = greedy(model, ids, attention_mask)
    layers = compressed_layers(out.past_key_values)
    assert sorted(layers) == [0, 1, 2]
    for index, layer in layers.items():
        keep = layer.context_keep
        assert not keep[0, :, :pad].any()
        if wrapper in ("none", "key_rerotation"):
            ratio = press.press.layer_compression_ratio if wrapper != "none" else press.layer_compression_ratio
            ratio = ratio(fake_context(model, index))
            kept = keep.sum(-1)  # (batch, kv_heads)
            if allocates_across_heads(scorer, wrapper):  # the layer total is the uniform one
                kept = kept.sum(-1, keepdim=True) / keep.shape[1]
            assert (kept[0] == expected_kept(SEQ - pad, ratio)).all()
            assert (kept[1] == expected_kept(SEQ, ratio)).all()


# --- PyramidKV ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("beta", [1, 2, 20])
def test_pyramid_budgets_decrease_with_depth_and_average_to_the_target(ratio, beta):
    layers = 8
    keep = [pyramid_keep_fraction(1 - ratio, beta, position, layers) for position in range(layers)]
    assert sum(keep) / layers == pytest.approx(1 - ratio)
    assert all(0 < fraction <= 1 for fraction in keep)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(keep, keep[1:]))
    if beta > 1:
        assert keep[-1] < keep[0]
    if (2 - 1 / beta) * (1 - ratio) <= 1:  # no clamp: the paper's endpoints
        assert keep[0] == pytest.approx((2 - 1 / beta) * (1 - ratio))
        assert keep[-1] == pytest.approx((1 - ratio) / beta)
    else:
        assert keep[0] == 1


def test_pyramid_layer_ratios_on_a_model():
    model = cached_model("llama")
    press = PyramidKVPress(compression_ratio=0.5, window_size=8)
    ratios = [press.layer_compression_ratio(fake_context(model, layer)) for layer in range(NUM_LAYERS)]
    assert ratios[0] < ratios[1] < ratios[2]
    assert sum(ratios) / NUM_LAYERS == pytest.approx(0.5)
    with press(model):
        out = greedy(model, random_ids(seq_len=SEQ), max_new_tokens=1)
    kept = [counts[0, 0].item() for counts in context_counts(out.past_key_values).values()]
    assert kept[0] > kept[1] > kept[2]
    assert sum(kept) == pytest.approx(NUM_LAYERS * SEQ * 0.5, abs=NUM_LAYERS)

    zero = PyramidKVPress(compression_ratio=0.0)
    assert [zero.layer_compression_ratio(fake_context(model, layer)) for layer in range(NUM_LAYERS)] == [0.0] * 3


def test_pyramid_spans_only_full_attention_layers():
    model = cached_model("gemma3")  # one full-attention layer: it gets exactly the target
    press = PyramidKVPress(compression_ratio=0.5)
    assert press.layer_compression_ratio(fake_context(model, 2)) == pytest.approx(0.5)


def test_adaptive_pyramid_uses_the_pyramid_layer_budget():
    model = cached_model("llama")
    inner = PyramidKVPress(compression_ratio=0.5, window_size=8)
    with AdaptivePress(inner)(model):
        out = greedy(model, random_ids(seq_len=SEQ), max_new_tokens=1)
    for layer, per_head in context_counts(out.past_key_values).items():
        uniform = expected_kept(SEQ, inner.layer_compression_ratio(fake_context(model, layer)))
        assert per_head.sum().item() == 2 * uniform


# --- StreamingLLM ------------------------------------------------------------------------------


def test_streaming_llm_keeps_sinks_and_recent_tokens():
    model = cached_model("llama")
    pad = 6
    ids = random_ids(batch=2, seq_len=SEQ)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    with StreamingLLMPress(compression_ratio=0.75, n_sink=4, backend="mask")(model):
        out = greedy(model, ids, attention_mask, max_new_tokens=1)
    for layer in compressed_layers(out.past_key_values).values():
        for row, start in ((0, pad), (1, 0)):
            kept = expected_kept(SEQ - start, 0.75)
            expected = [*range(start, start + 4), *range(SEQ - (kept - 4), SEQ)]
            for head in range(2):
                assert layer.context_keep[row, head].nonzero().flatten().tolist() == expected


# --- ObservedAttention -------------------------------------------------------------------------


def test_observed_attention_needs_eager_attention():
    model = cached_model("llama", "sdpa")
    before = hook_snapshot(model)
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        with ObservedAttentionPress(compression_ratio=0.5)(model):
            greedy(model, random_ids(seq_len=16), max_new_tokens=1)
    assert hook_snapshot(model) == before


def recorded_contexts(model, ids) -> list:
    """The PrefillContext of every compressed layer during a prefill of `ids`."""
    recorder = RecordingPress()
    with torch.no_grad(), recorder(model):
        model(ids)
    return recorder.contexts


def test_eager_attention_hands_the_weights_to_the_press(family):
    model = cached_model(family, "eager")
    ids = random_ids(seq_len=SEQ)
    with torch.no_grad():
        reference = model(ids, output_attentions=True).attentions
    press = RecordingPress()
    with torch.no_grad(), press(model):
        model(ids)
    assert [context.layer_idx for context in press.contexts] == full_layer_indices(model)
    for context in press.contexts:
        assert context.attentions is not None
        torch.testing.assert_close(context.attentions, reference[context.layer_idx])
        assert context.attentions.shape == (1, COMMON["num_attention_heads"], SEQ, SEQ)


def test_observed_attention_scores_are_the_mean_received_attention():
    model = cached_model("llama", "eager")
    ids = random_ids(seq_len=SEQ)
    context = recorded_contexts(model, ids)[1]
    scores = ObservedAttentionPress(compression_ratio=0.5).score(context)
    weights = context.attentions  # (1, 4 heads, seq, seq); heads 0,1 share KV head 0
    expected = torch.stack([weights[0, 0:2].mean(dim=(0, 1)), weights[0, 2:4].mean(dim=(0, 1))])
    torch.testing.assert_close(scores[0], expected)


@pytest.mark.parametrize("window", [1, 4, SEQ])
def test_snapkv_window_attention_is_the_models_own_attention(window):
    """SnapKV's mean window attention equals the eager attention weights of the last `window` queries,
    averaged over those queries and the query heads of each KV head."""
    model = cached_model("llama", "eager")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[1]
    weights = context.attentions[:, :, -window:]  # (1, 4 heads, window, seq); heads 0,1 share KV head 0
    expected = torch.stack([weights[0, 0:2].mean(dim=(0, 1)), weights[0, 2:4].mean(dim=(0, 1))])
    torch.testing.assert_close(mean_window_attention(context, window)[0], expected)


@pytest.mark.parametrize("pairs_at_once", [1, 3])
def test_snapkv_window_attention_in_slices_is_the_same_bit_for_bit(pairs_at_once, monkeypatch):
    """Above WINDOW_SCORES_BYTES the logits are computed a few (batch, KV head) pairs at a time: a left-padded
    batch of 2 rows x 2 KV heads, in slices of 1 and of 3 pairs (the last one partial), gives the scores of one
    pass exactly."""
    import adakv.presses.scorers.snapkv as snapkv

    model = cached_model("llama", "sdpa")
    ids = random_ids(batch=2, seq_len=SEQ)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    recorder = RecordingPress()
    with torch.no_grad(), recorder(model):
        model(ids, attention_mask=mask)
    context = recorder.contexts[1]
    assert not context.available.all()
    whole = mean_window_attention(context, 8)
    window_rows = context.module.config.num_attention_heads // context.keys.shape[1] * 8
    monkeypatch.setattr(snapkv, "WINDOW_SCORES_BYTES", pairs_at_once * window_rows * SEQ * 4)
    assert torch.equal(mean_window_attention(context, 8), whole)


# --- RoPE helpers, ExpectedAttention -----------------------------------------------------------


def phi3_partial_rotary_model():
    torch.manual_seed(0)
    config = Phi3Config(**COMMON, pad_token_id=0, partial_rotary_factor=0.5)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def llama_yarn_model():
    """YaRN RoPE: cos/sin carry an attention scaling factor (about 1.14 here), not just a rotation."""
    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128}
    config = LlamaConfig(**COMMON, rope_parameters=rope)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def model_of(family: str):
    if family == "phi3_partial":
        return phi3_partial_rotary_model()
    if family == "llama_yarn":
        return llama_yarn_model()
    return cached_model(family)


def model_rope(model, module, position_ids: torch.Tensor):
    """cos/sin exactly as the model's own rotary embedding produces them for `module`'s layer."""
    rotary = model.model.rotary_emb
    anchor = torch.zeros(1, dtype=torch.float32)
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(anchor, position_ids, module.config.layer_types[module.layer_idx])
    return rotary(anchor, position_ids)


FAMILIES_AND_PARTIAL = ["gemma3", "llama", "llama_yarn", "mistral", "phi3", "phi3_partial", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES_AND_PARTIAL)
def test_rope_helpers_match_the_model_rotary_embedding(family):
    model = model_of(family)
    module = attention_modules(model)[full_layer_indices(model)[-1]]
    positions = torch.tensor([[0, 3, 47, 200], [5, 6, 7, 8]])
    cos, sin = rope_cos_sin(module, positions)
    expected_cos, expected_sin = model_rope(model, module, positions)
    torch.testing.assert_close(cos, expected_cos.float())
    torch.testing.assert_close(sin, expected_sin.float())
    if family == "phi3_partial":
        assert cos.shape[-1] == module.head_dim // 2

    # future positions after the last context token, whatever that token's absolute position
    context_positions = torch.stack([torch.arange(SEQ), (torch.arange(SEQ) - 18).clamp(min=0)])  # row 1: padded
    last = context_positions[:, -1:]
    context = SimpleNamespace(module=module, position_embeddings=model_rope(model, module, context_positions))
    cos, sin = future_rope(context, torch.arange(1, 9))
    expected_cos, expected_sin = model_rope(model, module, last + torch.arange(1, 9))
    torch.testing.assert_close(cos, expected_cos.float())
    torch.testing.assert_close(sin, expected_sin.float())


@pytest.mark.parametrize("family", FAMILIES_AND_PARTIAL)
def test_expected_attention_of_one_known_query(family):
    """With one recent query (no spread) and one future position, the expected attention is the
    softmax attention of that query rotated to the next position: computed here with the model's
    own RoPE and modeling code."""
    model = model_of(family)
    ids = random_ids(seq_len=SEQ)
    context = recorded_contexts(model, ids)[-1]
    module = context.module
    press = ExpectedAttentionPress(
        compression_ratio=0.5, n_future_positions=1, n_recent=1, n_sink=0, use_value_norm=False
    )
    scores = press.score(context)

    query = pre_rope_queries(module, context.hidden_states[:, -1:])  # (1, heads, 1, head_dim)
    cos, sin = model_rope(model, module, torch.tensor([[SEQ]]))
    apply_rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    query, _ = apply_rotary(query, query, cos, sin)
    groups = module.config.num_attention_heads // module.config.num_key_value_heads
    keys = context.keys.repeat_interleave(groups, dim=1)
    weights = ((query @ keys.transpose(-1, -2)) * module.scaling).softmax(-1)[:, :, 0]  # (1, heads, seq)
    expected = weights.view(1, -1, groups, SEQ).mean(2)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_expected_attention_keeps_sinks_and_uses_covariance():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    press = ExpectedAttentionPress(compression_ratio=0.9, n_sink=3, n_recent=16, n_future_positions=8)
    keep = press.compress(context)
    assert keep[..., :3].all()
    with_covariance = press.score(context)
    without = ExpectedAttentionPress(n_sink=3, n_recent=16, n_future_positions=8, use_covariance=False).score(context)
    assert not torch.allclose(with_covariance[..., 3:], without[..., 3:])


# --- KeyRerotation -----------------------------------------------------------------------------


def fresh_keys(module, hidden_states: torch.Tensor, positions: torch.Tensor, model) -> torch.Tensor:
    """Keys (batch, kv_heads, seq, head_dim) recomputed from the layer input, rotated with the model's
    own RoPE code at per-head `positions` (batch, kv_heads, seq)."""
    batch, seq_len, _ = hidden_states.shape
    config = module.config
    if hasattr(module, "k_proj"):
        keys = module.k_proj(hidden_states)
    else:  # Phi3's fused projection: [q | k | v]
        start = config.num_attention_heads * module.head_dim
        keys = module.qkv_proj(hidden_states)[..., start : start + config.num_key_value_heads * module.head_dim]
    keys = keys.view(batch, seq_len, -1, module.head_dim)
    if hasattr(module, "k_norm"):
        keys = module.k_norm(keys)
    keys = keys.transpose(1, 2)
    apply_rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    rotated = []
    for head in range(keys.shape[1]):
        cos, sin = model_rope(model, module, positions[:, head])
        head_keys = keys[:, head : head + 1]
        rotated.append(apply_rotary(head_keys, head_keys, cos, sin)[1])
    return torch.cat(rotated, dim=1)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("family", FAMILIES_AND_PARTIAL)
def test_key_rerotation_equals_keys_computed_at_the_new_positions(family, adaptive):
    model = model_of(family)
    pad = 5
    ids = random_ids(batch=2, seq_len=SEQ, seed=4)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    inner = KnormPress(compression_ratio=0.5)
    press = KeyRerotationPress(AdaptivePress(inner) if adaptive else inner, backend="mask")  # reads dense keys

    inputs = {}

    def remember_input(module, args, kwargs):
        inputs.setdefault(module.layer_idx, kwargs["hidden_states"])

    modules = attention_modules(model)
    handles = [module.register_forward_pre_hook(remember_input, with_kwargs=True) for module in modules]
    try:
        with press(model):
            out = greedy(model, ids, attention_mask, max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()

    layers = compressed_layers(out.past_key_values)
    assert layers
    for index, layer in layers.items():
        keep = layer.context_keep
        assert not keep[0, :, :pad].any()
        new_positions = keep.long().cumsum(-1) - 1
        module = attention_modules(model)[index]
        expected = fresh_keys(module, inputs[index], new_positions.clamp(min=0), model)
        stored = layer.keys[:, :, :SEQ]
        torch.testing.assert_close(stored[keep], expected[keep], rtol=1e-4, atol=1e-5)
        # and it really moved them: at the original positions (row 1 has no padding) they differ
        original = fresh_keys(module, inputs[index], torch.arange(SEQ).expand(2, 2, SEQ), model)
        moved = keep[1] & (new_positions[1] != torch.arange(SEQ))
        assert moved.any()
        assert not torch.allclose(stored[1][moved], original[1][moved], atol=1e-3)


def test_key_rerotation_forwards_the_compression_ratio():
    press = KeyRerotationPress(AdaptivePress(SnapKVPress(compression_ratio=0.25)))
    assert press.compression_ratio == 0.25
    press.compression_ratio = 0.5
    assert press.press.press.compression_ratio == 0.5


# --- ComposedPress, ChunkPress, PerLayerCompressionPress ---------------------------------------


def test_composed_press_chooses_among_what_earlier_presses_kept():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    first = KnormPress(compression_ratio=0.5)
    second = StreamingLLMPress(compression_ratio=0.5, n_sink=2)
    composed = ComposedPress([first, second])
    assert composed.compression_ratio == pytest.approx(0.75)
    keep = composed.compress(context)
    first_keep = first.compress(context)
    assert (keep <= first_keep).all()
    assert (keep.sum(-1) == 12).all()
    # among Knorm's survivors, StreamingLLM keeps its first two and then the latest ones
    for head in range(2):
        survivors = first_keep[0, head].nonzero().flatten().tolist()
        assert keep[0, head].nonzero().flatten().tolist() == survivors[:2] + survivors[-10:]


def test_chunk_press_keeps_its_share_of_every_chunk():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    press = ChunkPress(StreamingLLMPress(compression_ratio=0.75, n_sink=1), chunk_length=20)
    keep = press.compress(context)
    # chunks of 20, 20, 8 keep 5, 5, 2: the first token and the newest of each chunk
    expected = [0, 16, 17, 18, 19, 20, 36, 37, 38, 39, 40, 47]
    assert keep[0, 0].nonzero().flatten().tolist() == expected
    assert press.compression_ratio == 0.75


def test_adaptive_around_per_layer_press():
    model = cached_model("qwen2")
    ratios = [0.25, 0.5, 0.75]
    press = AdaptivePress(PerLayerCompressionPress(SnapKVPress(window_size=8), ratios))
    assert press.compression_ratio == pytest.approx(0.5)
    with press(model):
        out = greedy(model, random_ids(seq_len=SEQ), max_new_tokens=1)
    for layer, per_head in context_counts(out.past_key_values).items():
        assert per_head.sum().item() == 2 * expected_kept(SEQ, ratios[layer])


def test_random_press_is_reproducible_with_a_seed():
    model = cached_model("llama")
    masks = []
    for seed in (7, 7, 8):
        with RandomPress(compression_ratio=0.5, seed=seed, backend="mask")(model):
            out = greedy(model, random_ids(seq_len=SEQ), max_new_tokens=1)
        masks.append(torch.stack([layer.context_keep for layer in compressed_layers(out.past_key_values).values()]))
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_knorm_and_keydiff_scores():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    keys = context.keys[0, 0]  # (seq, head_dim)
    torch.testing.assert_close(KnormPress().score(context)[0, 0], -keys.norm(dim=-1))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    anchor = unit.mean(0)
    expected = -(unit @ anchor) / anchor.norm()
    torch.testing.assert_close(KeyDiffPress().score(context)[0, 0], expected)


@pytest.mark.parametrize("family", ["gemma3", "llama", "llama_yarn", "phi3_partial"])
def test_expected_attention_with_covariance_matches_the_gaussian_formula(family):
    """Mean and covariance of 8 recent queries, rotated by the average of the model's own RoPE
    rotations at the next 4 positions: E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2), normalised."""
    model = model_of(family)
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[-1]
    module, head_dim = context.module, context.module.head_dim
    press = ExpectedAttentionPress(n_future_positions=4, n_recent=8, n_sink=0, use_value_norm=False)
    scores = press.score(context)

    queries = pre_rope_queries(module, context.hidden_states[:, -8:])[0]  # (heads, 8, head_dim)
    mean = queries.mean(1)
    centred = queries - mean[:, None]
    covariance = centred.transpose(-1, -2) @ centred / 8
    apply_rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    identity = torch.eye(head_dim)[None, None]
    rotations = []
    for position in range(SEQ, SEQ + 4):
        cos, sin = model_rope(model, module, torch.tensor([[position] * head_dim]))
        rotations.append(apply_rotary(identity, identity, cos, sin)[0][0, 0].T)  # R with R @ x = rope(x)
    rotation = torch.stack(rotations).mean(0)
    mean = mean @ rotation.T
    covariance = rotation @ covariance @ rotation.T
    groups = module.config.num_attention_heads // module.config.num_key_value_heads
    keys = context.keys[0].repeat_interleave(groups, dim=0)  # (heads, seq, head_dim)
    logits = module.scaling * torch.einsum("hd,hsd->hs", mean, keys)
    logits = logits + 0.5 * module.scaling**2 * torch.einsum("hsd,hde,hse->hs", keys, covariance, keys)
    expected = logits.softmax(-1).view(-1, groups, SEQ).mean(1)
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-6)


# --- ChunkKV -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_chunkkv_keeps_the_best_whole_chunks(shared):
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[1]
    inner = KnormPress(compression_ratio=0.5)
    keep = ChunkKVPress(inner, chunk_length=4, shared_across_heads=shared).compress(context)
    chunk_means = inner.score(context).view(1, 2, SEQ // 4, 4).mean(-1)  # (1, kv_heads, 12 chunks)
    if shared:
        chunk_means = chunk_means.mean(1, keepdim=True).expand(1, 2, -1)
    for head in range(2):
        best = chunk_means[0, head].topk(6).indices  # 24 kept tokens = 6 whole chunks
        expected = torch.zeros(SEQ // 4, dtype=torch.bool)
        expected[best] = True
        assert torch.equal(keep[0, head], expected.repeat_interleave(4))
    if shared:
        assert torch.equal(keep[0, 0], keep[0, 1])


def test_chunkkv_cuts_only_the_last_chunk_to_fill_the_budget():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    inner = KnormPress(compression_ratio=0.75)  # 12 tokens: two whole chunks of 5 and the best 2 of a third
    keep = ChunkKVPress(inner, chunk_length=5).compress(context)
    assert keep.sum(-1).tolist() == [[12, 12]]
    per_chunk = torch.nn.functional.pad(keep[0, 0], (0, 2)).view(-1, 5).sum(-1)
    assert sorted(per_chunk.tolist(), reverse=True)[:3] == [5, 5, 2] and per_chunk.sum() == 12


def test_chunkkv_refuses_bad_settings():
    with pytest.raises(ValueError, match="chunk_length"):
        ChunkKVPress(KnormPress(), chunk_length=0)
    with pytest.raises(TypeError, match="scoring press"):
        ChunkKVPress(ComposedPress([KnormPress()]))


# --- LagKV -------------------------------------------------------------------------------------


def test_lagkv_scores_each_partition_against_the_next():
    model = cached_model("qwen2")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[1]
    n_sink, lag = 3, 8  # 45 tokens after the sinks: partitions at 3, 11, 19, 27 are scored, 35..47 is recent
    scores = LagKVPress(n_sink=n_sink, lag_size=lag).score(context)
    for head in range(2):
        for start in range(n_sink, 35, lag):
            expected = 0
            for states in (context.keys[0, head], context.values[0, head]):
                current, following = states[start : start + lag], states[start + lag : start + 2 * lag]
                low, high = following.min(0).values, following.max(0).values
                expected = expected + ((current - low) / (high - low)).std(-1).softmax(-1)
            torch.testing.assert_close(scores[0, head, start : start + lag], expected)
    assert (scores[..., :n_sink] >= 4).all()
    recent = scores[0, 0, 35:]
    assert (recent >= 2).all() and (recent < 3).all() and (recent.diff() > 0).all()
    assert (scores[..., n_sink:35] <= 2).all()


def test_lagkv_keeps_sinks_then_the_recent_window():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    keep = LagKVPress(compression_ratio=0.75, n_sink=2, lag_size=16).compress(context)  # 12 kept, recent = 30
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, *range(38, 48)]
    assert LagKVPress(n_sink=2, lag_size=100).score(context)[..., 2:].diff(dim=-1).gt(0).all()  # all recent
    assert (LagKVPress(n_sink=SEQ + 5).score(context) >= 4).all()  # shorter than the sinks: all sinks


def test_lagkv_refuses_bad_settings():
    with pytest.raises(ValueError, match="lag_size"):
        LagKVPress(lag_size=0)
    with pytest.raises(ValueError, match="n_sink"):
        LagKVPress(n_sink=-1)


# --- SimLayerKV --------------------------------------------------------------------------------


def share_on_sinks_and_recent(context, n_last: int, n_sink: int, kept: int) -> float:
    """From the eager attention weights: the last n_last queries' mean attention on the first n_sink and
    the last (kept - n_sink) tokens."""
    weights = context.attentions[0, :, -n_last:].mean(dim=(0, 1))  # (seq,)
    return (weights[:n_sink].sum() + weights[SEQ - (kept - n_sink) :].sum()).item()


@pytest.mark.parametrize("lazy_count", [1, 2])
def test_simlayerkv_compresses_only_the_lazy_layers(lazy_count):
    model = cached_model("llama", "eager")
    ids = random_ids(seq_len=SEQ)
    kept = expected_kept(SEQ, 0.75)
    shares = [share_on_sinks_and_recent(c, 8, 2, kept) for c in recorded_contexts(model, ids)]
    ranked = sorted(shares, reverse=True)
    threshold = (ranked[lazy_count - 1] + ranked[lazy_count]) / 2
    press = SimLayerKVPress(compression_ratio=0.75, lazy_threshold=threshold, n_last=8, n_sink=2, backend="mask")
    with press(model):
        out = greedy(model, ids, max_new_tokens=1)
    layers = compressed_layers(out.past_key_values)
    assert sorted(layers) == sorted(i for i, share in enumerate(shares) if share >= threshold)
    assert len(layers) == lazy_count
    expected = [0, 1, *range(SEQ - (kept - 2), SEQ)]
    for layer in layers.values():
        assert all(layer.context_keep[0, h].nonzero().flatten().tolist() == expected for h in range(2))


def test_simlayerkv_refuses_bad_settings():
    with pytest.raises(ValueError, match="lazy_threshold"):
        SimLayerKVPress(lazy_threshold=1.5)
    with pytest.raises(ValueError, match="n_last"):
        SimLayerKVPress(n_last=0)


# --- BlockPress --------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_block_press_with_one_block_is_the_inner_press(scorer):
    model = cached_model("llama", attention_for(scorer))
    ids, attention_mask = random_ids(batch=2, seq_len=SEQ, seed=3), torch.ones(2, SEQ, dtype=torch.long)
    ids[0, :7], attention_mask[0, :7] = 0, 0
    recorder = RecordingPress()
    with torch.no_grad(), recorder(model):
        model(ids, attention_mask=attention_mask)
    inner = SCORERS[scorer](RATIO)
    for context in recorder.contexts:
        assert torch.equal(BlockPress(inner, block_size=SEQ).compress(context), inner.compress(context))


def test_block_press_of_a_context_free_score_is_the_global_top_k():
    model = cached_model("llama")
    inner = KnormPress(compression_ratio=0.7)
    for context in recorded_contexts(model, random_ids(seq_len=SEQ)):
        assert torch.equal(BlockPress(inner, block_size=7).compress(context), inner.compress(context))


class SizeRecordingKnorm(KnormPress):
    """KnormPress that remembers how many tokens every call to `score` saw."""

    sizes: list

    def score(self, context):
        self.sizes.append(context.seq_len)
        return super().score(context)


def test_block_press_scores_at_most_the_kept_tokens_plus_one_block():
    model = cached_model("llama")
    context = recorded_contexts(model, random_ids(seq_len=SEQ))[0]
    inner = SizeRecordingKnorm(compression_ratio=0.75)
    inner.sizes = []
    keep = BlockPress(inner, block_size=8).compress(context)
    assert keep.sum(-1).tolist() == [[12, 12]]
    assert len(inner.sizes) == SEQ // 8 and max(inner.sizes) <= 2 * 12 + 8


def test_block_press_refuses_bad_settings():
    with pytest.raises(ValueError, match="block_size"):
        BlockPress(KnormPress(), block_size=0)
    with pytest.raises(TypeError, match="scoring press"):
        BlockPress(ChunkPress(KnormPress()))
