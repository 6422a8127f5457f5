"""Each press's defining behaviour on a constructed input (issue 25), and which presses keep the attention sink.

Every test plants a structure its press must react to (a key of tiny norm, a token that alone spans a
direction, a key that draws the window's attention, a chunk of high scores, ...) and checks that the
press keeps or drops it, so a regression of that behaviour fails here. The papers' defaults, ours and
why they differ: docs/PRESSES.md, whose "Position 0" lists the sink test at the end reads."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from adakv import (
    AdaptivePress,
    BlockPress,
    ChunkKVPress,
    ChunkPress,
    ComposedPress,
    CriticalKVPress,
    CURPress,
    DecodingPress,
    DuoAttentionPress,
    ExpectedAttentionPress,
    FinchPress,
    HeadKVPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    KVzipPress,
    LagKVPress,
    MergePress,
    ObservedAttentionPress,
    PerLayerCompressionPress,
    PrefillDecodingPress,
    PyramidKVPress,
    RandomPress,
    RecordingPress,
    ScorerPress,
    SimLayerKVPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
    kept_token_counts,
)
from adakv import presses as all_presses
from adakv.cache import compressed_layers
from adakv.evaluation import registry
from adakv.models import queries, rope_cos_sin, rotate

from conftest import random_ids
from test_presses import SCORERS, SEQ, WRAPPERS, attention_for, cached_model, recorded_contexts

DOCS = Path(__file__).resolve().parents[1] / "docs" / "PRESSES.md"


def context_of(layer: int = 1, family: str = "llama", attn_implementation: str = "sdpa", seed: int = 1):
    """A recorded PrefillContext (batch 1, SEQ tokens, 2 KV heads of dim 16) whose keys and values are
    copies, so a test may plant structure in them."""
    recorded = recorded_contexts(cached_model(family, attn_implementation), random_ids(seq_len=SEQ, seed=seed))
    context = recorded[layer]
    return replace(context, keys=context.keys.clone(), values=context.values.clone())


def kept_positions(keep: torch.Tensor, head: int = 0) -> set[int]:
    """Positions kept by `head` of batch row 0 of a keep mask (batch, kv_heads, seq)."""
    return set(keep[0, head].nonzero().flatten().tolist())


def kept_count(ratio: float, available: int = SEQ) -> int:
    return max(1, round(available * (1 - ratio)))


def attract(context, head: int, position: int, window: int, logit: float = 20.0):
    """The context with a key at `position` of KV head `head` that draws the attention of the last `window`
    queries: along the mean of its query heads' window queries, scaled so the mean logit is `logit`. Every
    other key of the head before the window becomes 0 (all draw the same small share)."""
    cos, sin = context.position_embeddings
    window_queries = queries(context.module, context.hidden_states[:, -window:], (cos[:, -window:], sin[:, -window:]))
    groups = window_queries.shape[1] // context.keys.shape[1]
    group = window_queries[0, head * groups : (head + 1) * groups].reshape(-1, window_queries.shape[-1]).float()
    mean = group.mean(0)
    keys = context.keys.clone()
    keys[0, head, : context.seq_len - window] = 0
    keys[0, head, position] = (logit / context.module.scaling) * mean / mean.square().sum()
    return replace(context, keys=keys)


@dataclass
class FixedScores(ScorerPress):
    """A scoring press with given scores (batch, kv_heads, seq), to see what a wrapper does with them."""

    scores: torch.Tensor | None = None

    def score(self, context) -> torch.Tensor:
        return self.scores


def head_scores(*rows) -> torch.Tensor:
    """(1, len(rows), SEQ) scores, one row per KV head."""
    return torch.stack([torch.as_tensor(row, dtype=torch.float32) for row in rows])[None]


# --- ScorerPress, the base of the scoring presses -----------------------------------------------


def test_scorer_press_keeps_each_heads_best_share():
    context = context_of()
    scores = torch.rand(1, 2, SEQ, generator=torch.Generator().manual_seed(0))
    keep = FixedScores(0.75, scores=scores).compress(context)
    for head in range(2):
        assert kept_positions(keep, head) == set(scores[0, head].topk(kept_count(0.75)).indices.tolist())
    assert FixedScores(0.0, scores=scores).compress(context) is None  # ratio 0: the layer stays as it is


# --- attention-free scorers: Knorm, KeyDiff, CUR, LagKV, StreamingLLM, Random ------------------------


def test_knorm_keeps_low_norm_keys_and_drops_the_largest():
    context = context_of()
    context.keys[0, 0, 20] *= 1e-3
    context.keys[0, 0, 30] *= 1e3
    keep = KnormPress(0.9).compress(context)  # 5 of 48 kept
    assert 20 in kept_positions(keep, 0)
    assert 30 not in kept_positions(KnormPress(1 / SEQ).compress(context), 0)  # the first to go


def test_keydiff_keeps_the_key_unlike_the_others():
    context = context_of()
    direction = torch.randn(16, generator=torch.Generator().manual_seed(3))
    context.keys[0, 0] = direction  # every key of head 0 the same ...
    context.keys[0, 0, 30] = -direction  # ... but one
    assert 30 in kept_positions(KeyDiffPress(0.95).compress(context), 0)  # 2 of 48 kept


def test_cur_keeps_the_token_of_largest_leverage():
    context = context_of()
    for states in (context.keys, context.values):  # token 25 of head 1 alone spans the last channel
        states[0, 1, :, -1] = 0
        states[0, 1, 25, -1] = 0.01
    press = CURPress(0.95, rank=16, n_sink=0)  # 2 of 48 kept
    scores = press.score(context)
    assert scores[0, 1].argmax().item() == 25
    assert 25 in kept_positions(press.compress(context), 1)


def test_cur_keeps_the_sinks_even_when_their_leverage_is_zero():
    context = context_of()
    context.keys[0, :, :4] = 0  # the first four tokens span nothing: leverage 0 in every head
    context.values[0, :, :4] = 0
    alone = CURPress(0.5, rank=4, n_sink=0)
    assert not any(kept_positions(alone.compress(context), head) & {0, 1, 2, 3} for head in range(2))
    press = CURPress(0.5, rank=4)  # n_sink=4, the default
    assert press.n_sink == 4
    assert (press.score(context)[..., :4] == 1).all()
    for head in range(2):
        assert {0, 1, 2, 3} <= kept_positions(press.compress(context), head)
    # the sinks are the first *available* tokens: with the first three masked (padding), tokens 3 to 6
    padded = context.restrict(torch.arange(SEQ) >= 3)
    assert {3, 4, 5, 6} <= kept_positions(press.compress(padded), 0)
    with pytest.raises(ValueError, match="n_sink"):
        CURPress(0.5, n_sink=-1)


def test_cur_sinks_survive_adaptive_allocation():
    context = context_of()
    context.keys[0, :, :4] = 0
    context.values[0, :, :4] = 0
    keep = AdaptivePress(CURPress(0.75, rank=4)).compress(context)
    assert all({0, 1, 2, 3} <= kept_positions(keep, head) for head in range(2))


def test_lagkv_keeps_sinks_recent_window_and_the_token_that_stands_out_of_its_partition():
    context = context_of()
    press = LagKVPress(0.5, n_sink=4, lag_size=8)  # partitions 4-11, 12-19, 20-27, 28-35 scored; 36-47 recent
    for states in (context.keys, context.values):
        reference = states[0, 0, 20:28].amin(0)  # partition 12-19 is normalised by partition 20-27
        states[0, 0, 12:20] = reference  # all at the reference minimum: no spread ...
        states[0, 0, 15] = reference + 10 * torch.randn(16, generator=torch.Generator().manual_seed(4))  # ... but one
    scores = press.score(context)
    assert scores[0, 0, 12:20].argmax().item() == 15 - 12
    kept = kept_positions(press.compress(context), 0)
    assert {0, 1, 2, 3} | set(range(36, SEQ)) | {15} <= kept


def test_streaming_llm_keeps_the_first_and_the_last_tokens():
    keep = StreamingLLMPress(0.75, n_sink=4).compress(context_of())
    expected = {0, 1, 2, 3} | set(range(SEQ - (kept_count(0.75) - 4), SEQ))
    assert all(kept_positions(keep, head) == expected for head in range(2))


def test_random_press_is_reproducible_and_keeps_the_budget():
    context = context_of()
    first, again = RandomPress(0.5, seed=3).compress(context), RandomPress(0.5, seed=3).compress(context)
    assert torch.equal(first, again)
    assert not torch.equal(first, RandomPress(0.5, seed=4).compress(context))
    assert (first.sum(-1) == kept_count(0.5)).all()


# --- attention-based scorers: SnapKV, PyramidKV, TOVA, ObservedAttention, ExpectedAttention, Finch, ... --


def test_snapkv_keeps_its_window_and_the_key_the_window_attends_to():
    window = 8
    context = attract(context_of(), head=0, position=10, window=window)
    keep = SnapKVPress(0.8, window_size=window, kernel_size=1).compress(context)  # 10 kept: the window and 2
    assert set(range(SEQ - window, SEQ)) | {10} <= kept_positions(keep, 0)


def test_pyramidkv_layers_keep_less_with_depth_and_the_mean_budget():
    contexts = recorded_contexts(cached_model("llama"), random_ids(seq_len=SEQ))
    press = PyramidKVPress(0.5, window_size=8, beta=4)
    counts = [press.compress(context)[0, 0].sum().item() for context in contexts]
    assert counts[0] > counts[1] > counts[2]
    assert sum(counts) == pytest.approx(len(counts) * kept_count(0.5), abs=len(counts))


def test_tova_keeps_the_key_the_last_query_attends_to():
    context = attract(context_of(), head=1, position=7, window=1)
    assert 7 in kept_positions(TOVAPress(0.95).compress(context), 1)  # 2 of 48 kept


def test_observed_attention_keeps_the_heavy_hitter():
    context = context_of(attn_implementation="eager")
    causal = torch.ones(SEQ, SEQ).tril()
    uniform = causal / causal.sum(-1, keepdim=True)
    attentions = uniform.clone()
    attentions[30:] *= 0.5  # from position 30 on, every query puts half its attention on key 30
    attentions[30:, 30] += 0.5
    context = replace(context, attentions=attentions.expand(1, 4, SEQ, SEQ).clone())
    assert 30 in kept_positions(ObservedAttentionPress(0.95).compress(context), 0)  # 2 of 48 kept
    # the mean over *all* queries (H2O's accumulated sum, up to the factor SEQ): without the heavy hitter,
    # the earliest keys, seen by the most queries, rank first
    uniform_context = replace(context, attentions=uniform.expand(1, 4, SEQ, SEQ).clone())
    assert kept_positions(ObservedAttentionPress(0.95).compress(uniform_context), 0) == {0, 1}


def test_expected_attention_weighs_by_value_norm_and_keeps_sinks():
    context = context_of()
    context.values[0, 0, 20] = 0  # no value: expected contribution 0
    context.values[0, 0, 0] = 0  # a sink with no value is still kept
    keep = ExpectedAttentionPress(0.1, n_future_positions=16, n_recent=16).compress(context)
    assert 20 not in kept_positions(keep, 0)
    assert {0, 1, 2, 3} <= kept_positions(keep, 0)
    without_norm = ExpectedAttentionPress(0.1, n_future_positions=16, n_recent=16, use_value_norm=False)
    assert without_norm.score(context)[0, 0, 20] > 0  # its expected attention alone is not 0


def test_finch_keeps_the_question_and_the_key_it_attends_to():
    window = 8
    context = attract(context_of(), head=0, position=5, window=window)
    keep = FinchPress(0.7, window_size=window, chunk_length=10).compress(context)  # 14 kept: 8 + 6
    assert set(range(SEQ - window, SEQ)) | {5} <= kept_positions(keep, 0)


def test_simlayerkv_compresses_a_lazy_layer_to_sinks_and_recent_tokens_only():
    context = context_of()
    share = SimLayerKVPress(0.5, n_last=8).lazy_attention_share(context).item()
    lazy = SimLayerKVPress(0.5, n_last=8, lazy_threshold=max(share - 0.01, 0.0))
    streaming = StreamingLLMPress(0.5).compress(context)
    assert torch.equal(lazy.compress(context), streaming)
    busy = SimLayerKVPress(0.5, n_last=8, lazy_threshold=min(share + 0.01, 1.0))
    assert busy.compress(context) is None  # not lazy: everything kept


def test_duo_attention_retrieval_head_keeps_everything_and_streaming_head_sinks_and_recent():
    context = context_of()
    press = DuoAttentionPress(0.3, n_sink=2, n_recent=4, window_size=8)  # 2 x 34 kept: one head must stream
    streaming = press.streaming_heads(context)[0]
    assert streaming.sum().item() == 1
    keep = press.compress(context)
    stream, retrieve = int(streaming.nonzero()), int((~streaming).nonzero())
    assert kept_positions(keep, retrieve) == set(range(SEQ))
    recent = 2 * kept_count(0.3) - SEQ - 2
    assert kept_positions(keep, stream) == {0, 1} | set(range(SEQ - recent, SEQ))


def kvzip(ratio: float, **fields) -> KVzipPress:
    return KVzipPress(ratio, chunk_size=16, repeat_prompt_ids=(5, 9, 17, 33), backend="mask", **fields)


def keep_masks(press, model, ids) -> dict[int, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    return {index: layer.context_keep for index, layer in compressed_layers(cache).items()}


def test_kvzip_alone_allocates_one_budget_over_the_model_as_adaptive_press_does():
    model, ids = cached_model("llama"), random_ids(seq_len=40)
    alone = keep_masks(kvzip(0.6), model, ids)
    wrapped = keep_masks(AdaptivePress(kvzip(0.6), scope="model"), model, ids)
    assert alone.keys() == wrapped.keys() and len(alone) == 3
    assert all(torch.equal(alone[index], wrapped[index]) for index in alone)
    counts = torch.stack([mask.sum(-1) for mask in alone.values()])  # (layers, batch, kv_heads)
    assert counts.sum().item() == 3 * 2 * kept_count(0.6, 40)  # the model's total ...
    assert len(set(counts.flatten().tolist())) > 1  # ... not the same in every head


def test_kvzip_head_scope_keeps_each_heads_share_and_the_wrapper_decides():
    model, ids = cached_model("llama"), random_ids(seq_len=40)
    per_head = keep_masks(kvzip(0.6, budget_scope="head"), model, ids)
    assert all((mask.sum(-1) == kept_count(0.6, 40)).all() for mask in per_head.values())
    # inside AdaptivePress the wrapper allocates: budget_scope is not read
    for scope in ("layer", "model"):
        one = keep_masks(AdaptivePress(kvzip(0.6), scope=scope), model, ids)
        other = keep_masks(AdaptivePress(kvzip(0.6, budget_scope="head"), scope=scope), model, ids)
        assert all(torch.equal(one[index], other[index]) for index in one)
    with pytest.raises(ValueError, match=r"budget_scope must be one of \('model', 'head'\)"):
        KVzipPress(0.5, budget_scope="layer")


def test_registry_kvzip_names_say_what_they_allocate():
    assert registry.build_press("kvzip", 0.5).budget_scope == "head"  # KVzip uniform, as in the results
    assert registry.build_press("adakv_model_kvzip", 0.5).scope == "model"
    assert registry.build_press("adakv_kvzip", 0.5).scope == "layer"
    import pandas as pd

    from adakv.evaluation.report import adaptive_vs_uniform

    rows = [dict(task="t", context_length=64, sample=0, ratio=0.5, press=name, score=score)
            for name, score in [("kvzip", 0.25), ("adakv_kvzip", 0.5), ("adakv_model_kvzip", 0.75)]]
    paired = adaptive_vs_uniform(pd.DataFrame(rows)).set_index("adaptive")
    assert paired.loc[["adakv_kvzip", "adakv_model_kvzip"], "uniform"].tolist() == ["kvzip", "kvzip"]


# --- wrappers -----------------------------------------------------------------------------------


def test_adaptive_press_lends_budget_to_the_head_with_the_higher_scores():
    context = context_of()
    scores = head_scores(0.9 + 0.01 * torch.rand(SEQ), 0.1 + 0.01 * torch.rand(SEQ))
    keep = AdaptivePress(FixedScores(0.5, scores=scores), alpha_safeguard=0.2).compress(context)
    per_head = keep[0].sum(-1).tolist()
    floor = int(0.2 * kept_count(0.5))  # the safeguard: alpha x the mean budget
    assert per_head == [2 * kept_count(0.5) - floor, floor]


def test_block_press_of_a_context_free_score_is_the_inner_press():
    context = context_of()
    context.keys[0, 0, 40] *= 1e-3  # a low-norm key in the last block
    inner = KnormPress(0.75)
    keep = BlockPress(inner, block_size=16).compress(context)
    assert torch.equal(keep, inner.compress(context))
    assert 40 in kept_positions(keep, 0)


def test_chunkkv_keeps_whole_chunks_not_the_best_single_tokens():
    scores = torch.full((SEQ,), 0.5)
    scores[20:25] = 0.8  # the best chunk of 5
    scores[40] = 1.0  # the best single token, in a chunk of mean 0.6
    press = ChunkKVPress(FixedScores(0.9, scores=head_scores(scores, scores)), chunk_length=5)  # 5 kept
    keep = press.compress(context_of())
    assert kept_positions(keep, 0) == kept_positions(keep, 1) == set(range(20, 25))


def test_chunk_press_gives_every_chunk_its_share():
    context = context_of()
    context.keys[0, :, :16] *= 1e-3  # the first chunk's keys are all better (lower norm) than the rest
    keep = ChunkPress(KnormPress(0.5), chunk_length=16).compress(context)
    for start in (0, 16, 32):
        assert (keep[0, :, start : start + 16].sum(-1) == 8).all()
    assert KnormPress(0.5).compress(context)[0, :, 16:].sum() < 2 * 16  # alone it takes the first chunk whole


def test_composed_press_chooses_among_what_the_first_press_kept():
    context = context_of()
    first = KnormPress(0.5).compress(context)
    keep = ComposedPress([KnormPress(0.5), StreamingLLMPress(0.5)]).compress(context)
    assert not (keep & ~first).any()
    assert (keep.sum(-1) == kept_count(0.5, kept_count(0.5))).all()


def test_criticalkv_second_stage_weighs_by_the_projected_value_norm():
    context = context_of()
    context.values[0, 0, 10] *= 100  # a value that moves the output most
    context.values[0, 0, 20] = 0  # a value that moves it not at all
    flat = head_scores(torch.full((SEQ,), 0.5), torch.full((SEQ,), 0.5))
    perturbation_only = CriticalKVPress(FixedScores(0.5, scores=flat), first_stage_ratio=0.0)
    kept = kept_positions(perturbation_only.compress(context), 0)
    assert 10 in kept and 20 not in kept
    attention_only = CriticalKVPress(FixedScores(0.5, scores=flat), first_stage_ratio=1.0)
    assert kept_positions(attention_only.compress(context), 0) == set(range(kept_count(0.5)))  # ties: earliest


def test_headkv_gives_the_pool_to_the_important_head():
    context = context_of()
    press = HeadKVPress(KnormPress(0.5), base_fraction=0.5, window_size=8)
    press.head_importance = lambda context: torch.tensor([[1.0, 0.0]])  # head 0 reads far back, head 1 does not
    per_head = press.compress(context)[0].sum(-1).tolist()
    floor = int(0.5 * kept_count(0.5))
    assert per_head == [2 * kept_count(0.5) - floor, floor]


def test_key_rerotation_moves_each_kept_key_to_its_rank():
    context = context_of()
    original = context.keys.clone()
    keep = KeyRerotationPress(StreamingLLMPress(0.5)).compress(context)  # keeps 0-3 and 28-47
    kept = sorted(kept_positions(keep, 0))
    assert kept == [0, 1, 2, 3, *range(28, SEQ)]
    torch.testing.assert_close(context.keys[..., :4, :], original[..., :4, :])  # rank = position: unchanged
    cos, sin = rope_cos_sin(context.module, torch.tensor([[-24]]))  # 28 -> 4, 29 -> 5, ...: back by 24
    expected = rotate(original[..., 28:, :].float(), cos[:, None], sin[:, None])
    torch.testing.assert_close(context.keys[..., 28:, :].float(), expected, rtol=1e-5, atol=1e-5)


def test_merge_press_folds_evicted_values_into_the_next_kept_ones_only():
    context = context_of()
    keys, values = context.keys.clone(), context.values.clone()
    keep = MergePress(StreamingLLMPress(0.5), merge_window=2, window_size=8).compress(context)
    assert torch.equal(context.keys, keys)
    changed = (context.values != values).any(-1)[0]  # (kv_heads, seq)
    for head in range(2):
        assert set(changed[head].nonzero().flatten().tolist()) == {28, 29}  # the 2 kept after the evicted 4-27
    assert kept_positions(keep, 0) == {0, 1, 2, 3} | set(range(28, SEQ))


def test_think_prunes_the_key_channels_queries_and_keys_use_least():
    context = context_of()
    context.keys[0, 0, :, 3] = 0  # channel 3 of head 0 carries nothing
    context.keys[0, 0, :, 5] *= 100  # channel 5 carries the most
    ThinKPress(KnormPress(0.0), key_channel_compression_ratio=0.25, window_size=8).compress(context)
    zeroed = (context.keys[0, 0] == 0).all(0)  # (head_dim,)
    assert zeroed.sum().item() == 4 and zeroed[3] and not zeroed[5]


def test_per_layer_press_applies_each_layers_ratio():
    contexts = recorded_contexts(cached_model("llama"), random_ids(seq_len=SEQ))
    press = PerLayerCompressionPress(KnormPress(), [0.25, 0.5, 0.75])
    for context, ratio in zip(contexts, [0.25, 0.5, 0.75]):
        assert (press.compress(context).sum(-1) == kept_count(ratio)).all()


# --- presses acting after the prefill, and the recorder ---------------------------------------------


def decode(model, press, steps: int) -> list[dict]:
    """Prefill SEQ tokens with `press`, then `steps` greedy steps; the kept counts after each forward."""
    cache, counts = DynamicCache(config=model.config), []
    with torch.no_grad(), press(model):
        logits = model(random_ids(seq_len=SEQ), past_key_values=cache).logits
        counts.append(kept_token_counts(cache))
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            counts.append(kept_token_counts(cache))
    return counts


def test_decoding_press_leaves_the_context_and_recompresses_every_interval():
    counts = decode(cached_model("llama"), DecodingPress(KnormPress(), compression_interval=2, target_size=10), 3)
    assert counts[0] == {} and counts[1] == {}  # the context and the first step: dense
    assert all((per_head == 10).all() for per_head in counts[2].values()) and len(counts[2]) == 3
    assert all((per_head == 11).all() for per_head in counts[3].values())


def test_prefill_decoding_press_compresses_the_context_then_keeps_decoding_bounded():
    decoding = DecodingPress(KnormPress(), compression_interval=2, target_size=10)
    press = PrefillDecodingPress(StreamingLLMPress(0.5), decoding)
    counts = decode(cached_model("llama"), press, 2)
    assert all((per_head == kept_count(0.5)).all() for per_head in counts[0].values()) and len(counts[0]) == 3
    assert all((per_head == 10).all() for per_head in counts[2].values())


def test_recording_press_records_every_layer_and_compresses_nothing():
    model, recorder = cached_model("llama"), RecordingPress()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), recorder(model):
        model(random_ids(seq_len=SEQ), past_key_values=cache)
    assert [context.layer_idx for context in recorder.contexts] == [0, 1, 2]
    assert all(context.seq_len == SEQ for context in recorder.contexts)
    assert kept_token_counts(cache) == {}


# --- position 0 (the attention sink) over the press matrix ----------------------------------------------


def documented_presses(heading: str) -> set[str]:
    """The press classes listed (as "- `Name`...") under `heading` in docs/PRESSES.md's "Position 0" section."""
    text = DOCS.read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^- `(\w+)`", section, flags=re.MULTILINE))


KEEP_SINKS = "Always keep it"
KEEP_INNER_SINKS = "Keep it when the press inside keeps it"
MAY_EVICT = "May evict it"
NOT_PRESSES = {"BasePress", "ScorerPress", "WrapperPress", "PrefillContext"}  # bases, not presses to use


def test_every_press_is_documented_as_keeping_position_0_or_not():
    lists = {heading: documented_presses(heading) for heading in (KEEP_SINKS, KEEP_INNER_SINKS, MAY_EVICT)}
    presses = set(all_presses.__all__) - NOT_PRESSES
    listed = [name for names in lists.values() for name in names]
    assert sorted(listed) == sorted(presses), "each press in exactly one list of docs/PRESSES.md, 'Position 0'"


def class_name(scorer: str) -> str:
    return type(SCORERS[scorer](0.5)).__name__


def wrapper_class_name(wrapper: str) -> str:
    return type(WRAPPERS[wrapper](KnormPress(0.5), 0.5)).__name__


SINK_SCORERS = sorted(s for s in SCORERS if class_name(s) in documented_presses(KEEP_SINKS))
SINK_WRAPPERS = ["none"] + sorted(
    w for w in WRAPPERS if w != "none" and wrapper_class_name(w) in documented_presses(KEEP_INNER_SINKS)
)


def test_the_matrix_covers_the_documented_lists():
    """The presses that claim to keep the sink are all run below; the others are documented as not claiming it."""
    assert {class_name(s) for s in SINK_SCORERS} == documented_presses(KEEP_SINKS) - {"RecordingPress"}
    tested_wrappers = {wrapper_class_name(w) for w in SINK_WRAPPERS if w != "none"}
    assert tested_wrappers == documented_presses(KEEP_INNER_SINKS) & {wrapper_class_name(w) for w in WRAPPERS}
    for scorer in set(SCORERS) - set(SINK_SCORERS):
        assert class_name(scorer) in documented_presses(MAY_EVICT)


@pytest.mark.parametrize("wrapper", SINK_WRAPPERS)
@pytest.mark.parametrize("scorer", SINK_SCORERS)
def test_position_0_survives_every_press_that_claims_to_keep_sinks(scorer, wrapper):
    """Ratio 0.75: every (layer, KV head) of the tiny model keeps a quarter of the context, position 0 among it."""
    model = cached_model("llama", attention_for(scorer))
    press = WRAPPERS[wrapper](SCORERS[scorer](0.75), 0.75)
    press.backend = "mask"
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_ids(seq_len=SEQ, seed=5), past_key_values=cache)
    layers = compressed_layers(cache)
    assert layers, "nothing was compressed"
    for index, layer in layers.items():
        assert layer.context_keep[..., 0].all(), f"layer {index} evicted position 0 in some head"
