"""Press-specific behaviour of CURPress, FinchPress, DuoAttentionPress, HeadKVPress, ThinKPress and
MergePress (their runs through the press x wrapper x family matrix are in test_presses.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adakv import (
    CURPress,
    DuoAttentionPress,
    FinchPress,
    HeadKVPress,
    KnormPress,
    MergePress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
)
from adakv.presses.scorers.cur import leverage_scores
from adakv.presses.scorers.duo_attention import count_streaming_heads
from adakv.presses.wrappers.merge import merge_evicted_values
from adakv.models import queries
from adakv.presses.scorers.snapkv import mean_window_attention
from adakv.selection import kept_count

from conftest import random_ids
from adakv import kept_token_counts
from adakv.evaluation import engine, registry
from test_chunked_prefill import run_refused
from test_evict import left_padded_batch, run
from test_presses import SEQ, cached_model, recorded_contexts


def context_of(layer: int = 1, family: str = "llama", seq_len: int = SEQ, attn_implementation: str = "sdpa"):
    return recorded_contexts(cached_model(family, attn_implementation), random_ids(seq_len=seq_len))[layer]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, "0.5", None])
@pytest.mark.parametrize("press_class", [CURPress, FinchPress, DuoAttentionPress], ids=lambda cls: cls.__name__)
def test_scorer_ratio_outside_0_1(press_class, ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press_class(compression_ratio=ratio)


@pytest.mark.parametrize("wrapper", [HeadKVPress, ThinKPress, MergePress], ids=lambda cls: cls.__name__)
def test_wrappers_need_a_press(wrapper):
    with pytest.raises(TypeError, match="BasePress instance"):
        wrapper(0.5)


# --- CUR ---------------------------------------------------------------------------------------


def svd_leverage(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    left, _, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return left[:, :rank].square().sum(-1).float()


@pytest.mark.parametrize("rank", [1, 3, 8, 100])
def test_leverage_scores_are_the_row_norms_of_the_top_left_singular_vectors(rank):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 40, 8, generator=generator)
    available = torch.ones(2, 3, 40, dtype=torch.bool)
    scores = leverage_scores(rows, available, rank)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(scores[b, h], svd_leverage(rows[b, h], rank), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.sum(-1), torch.full((2, 3), float(min(rank, 8))), rtol=1e-4, atol=1e-4)


def test_leverage_scores_ignore_unavailable_rows():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(1, 1, 30, 6, generator=generator)
    available = torch.ones(1, 1, 30, dtype=torch.bool)
    available[..., :7] = False
    rows_with_noise = rows.clone()
    rows_with_noise[..., :7, :] = 1e3  # padding garbage must not move the scores of the real rows
    scores = leverage_scores(rows_with_noise, available, 4)
    assert (scores[..., :7] == 0).all()
    torch.testing.assert_close(scores[0, 0, 7:], svd_leverage(rows[0, 0, 7:], 4), rtol=1e-4, atol=1e-5)


def test_rank_deficient_matrix_has_no_spurious_directions():
    rows = torch.zeros(1, 1, 10, 4)
    rows[..., 0] = torch.arange(1.0, 11.0)  # rank one
    scores = leverage_scores(rows, torch.ones(1, 1, 10, dtype=torch.bool), 4)
    expected = torch.arange(1.0, 11.0).square() / torch.arange(1.0, 11.0).square().sum()
    torch.testing.assert_close(scores[0, 0], expected)


def test_cur_keeps_the_token_that_alone_spans_a_direction():
    context = context_of()
    keys, values = context.keys.clone(), context.values.clone()
    # token 20 of head 0 gets a key and a value direction no other token has: leverage 1 in both
    keys[0, 0, :, -1] = 0
    values[0, 0, :, -1] = 0
    keys[0, 0, 20, -1] = 0.01
    values[0, 0, 20, -1] = 0.01
    context = replace(context, keys=keys, values=values)
    press = CURPress(compression_ratio=0.9, rank=keys.shape[-1])
    scores = press.score(context)
    assert scores[0, 0, 20] == pytest.approx(1.0, abs=1e-4)
    assert press.compress(context)[0, 0, 20]
    both = scores
    keys_only = CURPress(rank=4, leverage_of="keys").score(context)
    values_only = CURPress(rank=4, leverage_of="values").score(context)
    torch.testing.assert_close(CURPress(rank=4).score(context), keys_only * values_only)
    assert not torch.allclose(both, CURPress(rank=4).score(context))  # the rank matters


@pytest.mark.parametrize("field, value", [("rank", 0), ("rank", 2.0), ("rank", True), ("leverage_of", "queries")])
def test_cur_bad_input(field, value):
    with pytest.raises(ValueError, match=field):
        CURPress(**{field: value})


# --- Finch -------------------------------------------------------------------------------------


def finch_reference(context, window: int, chunk: int, ratio: float) -> list[list[set[int]]]:
    """Finch's bounded cache, step by step with Python sets, from the eager attention weights: the
    question's attention restricted to a key set S is w / sum(w over S), row by row."""
    weights = context.attentions[0, :, -window:].double()  # (heads, window, seq)
    seq_len = context.seq_len
    kv_heads = context.keys.shape[1]
    groups = weights.shape[0] // kv_heads
    budget = int(kept_count(torch.tensor(seq_len), ratio)) - window
    question = set(range(seq_len - window, seq_len))
    kept = []
    for head in range(kv_heads):
        rows = weights[head * groups : (head + 1) * groups].reshape(-1, seq_len)
        cache: set[int] = set()
        for start in range(0, seq_len - window, chunk):
            candidates = cache | set(range(start, min(start + chunk, seq_len - window)))
            keys = sorted(candidates | question)
            restricted = rows[:, keys] / rows[:, keys].sum(-1, keepdim=True)
            attention = dict(zip(keys, restricted.mean(0).tolist()))
            cache = set(sorted(candidates, key=lambda i: (-attention[i], i))[:budget])
        kept.append(cache | question)
    return [kept]


@pytest.mark.parametrize("chunk", [7, 10, 100])
def test_finch_keeps_the_bounded_cache_of_the_question_attention(chunk):
    context = context_of(attn_implementation="eager")
    press = FinchPress(compression_ratio=0.6, window_size=8, chunk_length=chunk)
    keep = press.compress(context)
    expected = finch_reference(context, 8, chunk, 0.6)
    for head, positions in enumerate(expected[0]):
        assert set(keep[0, head].nonzero().flatten().tolist()) == positions


def test_finch_in_one_chunk_is_a_top_k_of_the_question_attention():
    context = context_of()
    press = FinchPress(compression_ratio=0.5, window_size=8, chunk_length=SEQ)
    keep = press.compress(context)
    attention = mean_window_attention(context, 8)[..., : SEQ - 8]
    top = attention.topk(SEQ // 2 - 8, dim=-1).indices.sort(-1).values
    for head in range(2):
        assert keep[0, head].nonzero().flatten().tolist() == top[0, head].tolist() + list(range(SEQ - 8, SEQ))


def test_finch_chunks_change_the_choice_and_the_scores_rank_the_cache_first():
    context = context_of(attn_implementation="eager")
    small = FinchPress(compression_ratio=0.6, window_size=8, chunk_length=7)
    assert not torch.equal(small.compress(context), FinchPress(0.6, window_size=8, chunk_length=SEQ).compress(context))
    # the score order: the question first, and its top `budget` is exactly the bounded cache
    scores = small.score(context)
    ranks = scores[0].argsort(dim=-1, descending=True, stable=True)
    assert set(ranks[0, :8].tolist()) == set(range(SEQ - 8, SEQ))
    kept = set(small.compress(context)[0, 0].nonzero().flatten().tolist())
    assert set(ranks[0, : SEQ - round(SEQ * 0.6)].tolist()) == kept


@pytest.mark.parametrize("field", ["window_size", "chunk_length"])
@pytest.mark.parametrize("value", [0, 2.5, True])
def test_finch_bad_input(field, value):
    with pytest.raises(ValueError, match=field):
        FinchPress(**{field: value})


# --- DuoAttention ------------------------------------------------------------------------------


def group_mean_window_weights(context, window: int) -> torch.Tensor:
    """(kv_heads, seq): eager attention of the last `window` queries, averaged over them and each group."""
    weights = context.attentions[0, :, -window:]  # (heads, window, seq)
    kv_heads = context.keys.shape[1]
    return weights.reshape(kv_heads, -1, context.seq_len).mean(1)


@pytest.mark.parametrize("budget, expected", [(40, 0), (39, 1), (33, 1), (32, 2), (19, 3), (12, 4)])
def test_count_streaming_heads_is_the_fewest_that_fit(budget, expected):
    share = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    available = torch.ones(1, 4, 10, dtype=torch.bool)
    # k streaming heads keep 3 tokens each, the others 10: cost 40 - 7k
    assert count_streaming_heads(share, available, torch.tensor([budget]), 3).tolist() == [expected]


def test_count_streaming_heads_takes_the_most_local_heads_first():
    share = torch.tensor([[0.1, 0.9, 0.5]])
    available = torch.ones(1, 3, 10, dtype=torch.bool)
    available[0, 1, :8] = False  # the most local head has only 2 tokens: streaming saves nothing there
    assert count_streaming_heads(share, available, torch.tensor([15]), 3).tolist() == [2]


def test_duo_attention_local_share_is_the_attention_on_sinks_and_recent_tokens():
    context = context_of(attn_implementation="eager")
    press = DuoAttentionPress(n_sink=2, n_recent=4, window_size=8)
    weights = group_mean_window_weights(context, 8)
    expected = weights[:, [0, 1, 44, 45, 46, 47]].sum(-1)
    torch.testing.assert_close(press.local_share(context)[0], expected)


def test_duo_attention_streams_the_most_local_head_and_keeps_everything_in_the_other():
    context = context_of(attn_implementation="eager")
    press = DuoAttentionPress(compression_ratio=0.25, n_sink=2, n_recent=4, window_size=8)
    keep = press.compress(context)[0]
    share = press.local_share(context)[0]
    streaming, retrieval = int(share.argmax()), int(share.argmin())
    assert press.streaming_heads(context)[0].tolist() == [head == streaming for head in range(2)]
    assert keep[retrieval].all()
    # layer budget 2 * 36 = 72: 48 for the retrieval head, 24 = 2 sinks + the 22 most recent
    assert keep[streaming].nonzero().flatten().tolist() == [0, 1, *range(SEQ - 22, SEQ)]


def test_duo_attention_streams_every_head_when_the_budget_is_small():
    context = context_of()
    press = DuoAttentionPress(compression_ratio=0.75, n_sink=2, n_recent=4, window_size=8)
    assert press.streaming_heads(context).all()
    keep = press.compress(context)[0]
    for head in range(2):
        assert keep[head].nonzero().flatten().tolist() == [0, 1, *range(SEQ - 10, SEQ)]


@pytest.mark.parametrize("field, value", [("n_sink", -1), ("n_recent", 0), ("window_size", 0), ("n_recent", 1.5)])
def test_duo_attention_bad_input(field, value):
    with pytest.raises(ValueError, match=field):
        DuoAttentionPress(**{field: value})


# --- HeadKV ------------------------------------------------------------------------------------


class FixedImportanceHeadKV(HeadKVPress):
    """HeadKVPress with given head importances (batch, kv_heads), to test the allocation alone."""

    importance: torch.Tensor | None = None

    def head_importance(self, context):
        return self.importance


def dhondt(weights: list[float], seats: int, caps: list[int]) -> list[int]:
    """Reference D'Hondt apportionment: each seat to the largest weight / (seats so far + 1)."""
    given = [0] * len(weights)
    for _ in range(seats):
        quotients = [w / (g + 1) if g < cap else -1.0 for w, g, cap in zip(weights, given, caps)]
        given[quotients.index(max(quotients))] += 1
    return given


@pytest.mark.parametrize("importance", [[3.0, 1.0], [0.2, 0.7], [1.0, 0.0], [0.5, 0.5]])
@pytest.mark.parametrize("base_fraction", [0.0, 0.5, 0.9])
def test_headkv_pools_the_budget_in_proportion_to_importance(importance, base_fraction):
    context = context_of()
    inner = KnormPress(compression_ratio=0.5)
    press = FixedImportanceHeadKV(inner, base_fraction=base_fraction)
    press.importance = torch.tensor([importance])
    keep = press.compress(context)[0]
    floor = int(base_fraction * 24)
    expected = [floor + extra for extra in dhondt(importance, 48 - 2 * floor, [SEQ - floor] * 2)]
    assert keep.sum(-1).tolist() == expected
    for head in range(2):  # within its budget, each head keeps its best tokens by the inner press
        best = inner.score(context)[0, head].topk(expected[head]).indices.sort().values
        assert keep[head].nonzero().flatten().tolist() == best.tolist()


def test_headkv_never_gives_a_head_more_than_it_has():
    context = context_of()
    available = context.available.clone()
    available[0, 0, :40] = False  # head 0 has 8 tokens, head 1 has 48: layer budget 4 + 24
    press = FixedImportanceHeadKV(KnormPress(compression_ratio=0.5), base_fraction=0.0)
    press.importance = torch.tensor([[1.0, 0.01]])
    keep = press.compress(context.restrict(available))[0]
    assert keep.sum(-1).tolist() == [8, 20]
    assert not keep[0, :40].any()


def test_headkv_with_a_full_base_fraction_is_the_uniform_inner_press():
    context = context_of()
    inner = KnormPress(compression_ratio=0.5)
    assert torch.equal(HeadKVPress(inner, base_fraction=1.0).compress(context), inner.compress(context))


def test_headkv_importance_is_the_window_attention_on_the_distant_context():
    context = context_of(attn_implementation="eager")
    press = HeadKVPress(KnormPress(), window_size=8, n_sink=2)
    distant = group_mean_window_weights(context, 8)[:, 2 : SEQ - 8].sum(-1)
    torch.testing.assert_close(press.head_importance(context)[0], distant, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs", [{"base_fraction": 1.5}, {"base_fraction": "0.5"}, {"window_size": 0}, {"n_sink": -1}]
)
def test_headkv_bad_input(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        HeadKVPress(KnormPress(), **kwargs)


def test_headkv_needs_a_scoring_press():
    with pytest.raises(TypeError, match="scoring press"):
        HeadKVPress(HeadKVPress(KnormPress()))


# --- ThinK -------------------------------------------------------------------------------------


def test_think_zeroes_the_channels_with_the_smallest_query_key_norm_product():
    context = context_of()
    original = context.keys.clone()
    inner = KnormPress(compression_ratio=0.5)
    expected_keep = inner.compress(context)
    press = ThinKPress(inner, key_channel_compression_ratio=0.25, window_size=8)
    keep = press.compress(context)
    assert torch.equal(keep, expected_keep)  # tokens: the inner press's choice, made on the original keys

    cos, sin = context.position_embeddings
    window_queries = queries(context.module, context.hidden_states[:, -8:], (cos[:, -8:], sin[:, -8:]))[0]
    head_dim = original.shape[-1]
    for head in range(2):
        group = window_queries[2 * head : 2 * head + 2].reshape(-1, head_dim)  # query heads 2h, 2h + 1
        product = group.norm(dim=0) * original[0, head].norm(dim=0)
        pruned = set(product.argsort()[: head_dim // 4].tolist())
        zero = {c for c in range(head_dim) if (context.keys[0, head, :, c] == 0).all()}
        assert zero == pruned
        kept_channels = sorted(set(range(head_dim)) - pruned)
        assert torch.equal(context.keys[0, head][:, kept_channels], original[0, head][:, kept_channels])


def test_think_logits_are_those_of_queries_and_keys_without_the_pruned_channels():
    """Zeroing a key channel is the same as dropping that channel from the query and the key."""
    context = context_of()
    press = ThinKPress(KnormPress(compression_ratio=0.0), key_channel_compression_ratio=0.5, window_size=8)
    pruned = press.pruned_channels(context)[0, 0]
    keys = context.keys[0, 0].clone()
    query = torch.randn(keys.shape[-1], generator=torch.Generator().manual_seed(0))
    keep = press.compress(context)
    torch.testing.assert_close(context.keys[0, 0] @ query, keys[:, ~pruned] @ query[~pruned])
    assert torch.equal(keep, context.available)  # no token pruned, but the layer is rebuilt from the edited keys


def test_think_is_refused_in_a_chunked_prefill():
    with pytest.raises(ValueError, match="ThinKPress cannot run in a chunked prefill"):
        run_refused(ThinKPress(SnapKVPress(0.5)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"key_channel_compression_ratio": 1.0}, "key_channel_compression_ratio"),
        ({"key_channel_compression_ratio": -0.1}, "key_channel_compression_ratio"),
        ({"window_size": 0}, "window_size"),
    ],
)
def test_think_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThinKPress(KnormPress(), **kwargs)


# --- Merge (CaM) -------------------------------------------------------------------------------


def merge_reference(values, keep, available, attention, merge_window):
    """Loop version of the merge for one (batch, head): values (seq, d), the rest (seq,)."""
    merged = values.double().clone()
    kept = keep.nonzero().flatten().tolist()
    for i in range(values.shape[0]):
        if keep[i] or not available[i]:
            continue
        targets = [j for j in kept if j > i][:merge_window]
        if not targets:
            continue
        mean = sum(attention[j].item() for j in targets) / len(targets)
        probability = min(1.0, attention[i].item() / mean)
        for j in targets:
            merged[j] += probability * values[i].double() / len(targets)
    return merged


@pytest.mark.parametrize("merge_window", [1, 3])
def test_merge_folds_each_evicted_value_into_the_next_kept_ones(merge_window):
    context = context_of()
    keys, values = context.keys.clone(), context.values.clone()
    inner = KnormPress(compression_ratio=0.7)
    press = MergePress(inner, merge_window=merge_window, window_size=8)
    attention = mean_window_attention(context, 8)
    keep = press.compress(context)
    assert torch.equal(keep, inner.compress(context))
    assert torch.equal(context.keys, keys)
    for head in range(2):
        expected = merge_reference(values[0, head], keep[0, head], context.available[0, head], attention[0, head],
                                   merge_window)
        torch.testing.assert_close(context.values[0, head].double(), expected, rtol=1e-5, atol=1e-6)
        # the attention-weighted sum of kept values regains min(a_i, mean a of targets) v_i per evicted i
        a, kept = attention[0, head].double(), keep[0, head]
        before = (a[kept, None] * values[0, head][kept].double()).sum(0)
        after = (a[kept, None] * context.values[0, head][kept].double()).sum(0)
        regained = (a[kept, None] * (expected[kept] - values[0, head][kept].double())).sum(0)
        torch.testing.assert_close(after - before, regained, rtol=1e-4, atol=1e-6)
    assert not torch.equal(context.values, values)


def test_merge_restores_the_evicted_term_when_the_evicted_token_draws_less_attention():
    original = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]]])  # (1, 1, 4, 2)
    values = original.clone()
    keep = torch.tensor([[[True, False, True, True]]])
    attention = torch.tensor([[[0.4, 0.1, 0.2, 0.3]]])
    merge_evicted_values(values, keep, torch.ones_like(keep), attention, merge_window=2)
    # token 1 (a = 0.1) goes to tokens 2 and 3 (mean a = 0.25): p = 0.4, each gets 0.2 * v_1
    torch.testing.assert_close(values[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.2], [4.0, 0.2]]))
    added = (attention[0, 0, :, None] * (values - original)[0, 0]).sum(0)
    torch.testing.assert_close(added, 0.1 * original[0, 0, 1])  # exactly the evicted term a_1 v_1


def test_merge_is_refused_in_a_chunked_prefill():
    with pytest.raises(ValueError, match="MergePress cannot run in a chunked prefill"):
        run_refused(MergePress(SnapKVPress(0.5)))


@pytest.mark.parametrize("field, value", [("merge_window", 0), ("window_size", 0), ("merge_window", 1.5)])
def test_merge_bad_input(field, value):
    with pytest.raises(ValueError, match=field):
        MergePress(KnormPress(), **{field: value})


# --- registry names and the evaluation's fast path ----------------------------------------------

NEW_REGISTRY_NAMES = [
    "cur", "adakv_cur", "finch", "adakv_finch", "duo_attention", "headkv_snapkv", "think_snapkv", "merge_snapkv",
    "merge_streaming_llm",
]


def question_logits(model, cache, question) -> torch.Tensor:
    return model(question, past_key_values=cache).logits[:, -1]


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("name", NEW_REGISTRY_NAMES)
def test_registry_presses_give_the_same_answer_through_the_fast_path(name, backend):
    """The evaluation compresses one recorded dense prefill many ways (`compressed_layer` on copies);
    that must equal compressing during the prefill, also for presses that edit keys or values."""
    model = cached_model("llama")
    ids, question = random_ids(1, SEQ), random_ids(1, 4, seed=9)
    press = registry.build_press(name, 0.5, backend=backend)
    with torch.no_grad():
        dense = engine.dense_prefill(model, ids)
        with press(model):
            fast = question_logits(model, engine.compressed_cache(dense, press), question)
            naive = question_logits(model, engine.prefill(model, ids), question)
            fast_again = question_logits(model, engine.compressed_cache(dense, press), question)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_again, naive, rtol=1e-5, atol=1e-5)  # the recorded prefill is left as it was


# --- both backends ----------------------------------------------------------------------------

BACKEND_PRESSES = {  # name: (family, the press on a backend)
    "cur": ("llama", lambda backend: CURPress(0.5, rank=4, backend=backend)),
    "finch": ("llama", lambda backend: FinchPress(0.5, window_size=8, chunk_length=10, backend=backend)),
    "duo_attention": ("qwen2", lambda backend: DuoAttentionPress(0.3, n_recent=4, window_size=8, backend=backend)),
    "headkv": ("llama", lambda backend: HeadKVPress(SnapKVPress(0.6, window_size=8), window_size=8, backend=backend)),
    "think": ("qwen3", lambda backend: ThinKPress(SnapKVPress(0.5, window_size=8), window_size=8, backend=backend)),
    "merge": ("llama", lambda backend: MergePress(StreamingLLMPress(0.6), window_size=8, backend=backend)),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", sorted(BACKEND_PRESSES))
def test_evict_gives_the_logits_and_counts_of_mask(name, padded):
    family, make_press = BACKEND_PRESSES[name]
    model = cached_model(family)
    ids, attention_mask = left_padded_batch() if padded else (random_ids(1, SEQ), None)
    runs = {backend: run(model, make_press(backend), ids, attention_mask) for backend in ("mask", "evict")}
    for mask_logits, evict_logits in zip(runs["mask"][0], runs["evict"][0]):
        torch.testing.assert_close(evict_logits, mask_logits, rtol=1e-5, atol=1e-5)
    mask_counts, evict_counts = kept_token_counts(runs["mask"][1]), kept_token_counts(runs["evict"][1])
    assert mask_counts.keys() == evict_counts.keys() and mask_counts
    assert all(torch.equal(mask_counts[index], evict_counts[index]) for index in mask_counts)


INNER_PRESSES = {"think": lambda: SnapKVPress(0.5, window_size=8), "merge": lambda: StreamingLLMPress(0.6)}


@pytest.mark.parametrize("name", sorted(INNER_PRESSES))
def test_the_cache_edits_change_the_answer(name):
    family, make_press = BACKEND_PRESSES[name]
    inner = INNER_PRESSES[name]
    model = cached_model(family)
    edited, _ = run(model, make_press("mask"), random_ids(1, SEQ))
    inner_alone, _ = run(model, inner(), random_ids(1, SEQ))
    assert torch.allclose(inner_alone[0], edited[0])  # the prefill's own logits come before any edit
    assert not torch.allclose(inner_alone[1], edited[1])
