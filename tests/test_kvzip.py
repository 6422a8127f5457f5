"""KVzipPress: scores from the model's reconstruction of the context, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_backends_agree, random_ids, tiny_model
from test_evict import run
from test_pipeline import CONTEXT, QUESTIONS, tiny_pair
from transformers import DynamicCache, pipeline

from adakv import AdaptivePress, ChunkPress, KVzipPress, kept_token_counts, prefill_in_chunks
from adakv.cache import compressed_layers
from adakv.evaluation import engine, registry
from adakv.models import attention_modules, is_full_attention_layer
from adakv.presses.scorers.kvzip import reconstruction_scores

SEQ = 40
PROMPT = (5, 9, 17, 33)


def kvzip(ratio=0.5, chunk_size=16, backend="mask", **kwargs):
    return KVzipPress(ratio, chunk_size=chunk_size, repeat_prompt_ids=PROMPT, backend=backend, **kwargs)


def scores_of(model, ids, chunk_size):
    dense = engine.dense_prefill(model, ids)
    prefill = engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids)
    scores = reconstruction_scores(prefill, PROMPT, chunk_size)
    assert dense.cache.get_seq_length() == ids.shape[1]  # the reconstruction left the cache
    return scores, dense


def brute_force_scores(family, ids) -> dict[int, torch.Tensor]:
    """Eager attention of the whole sequence context + prompt + context in one forward: for each
    context key, the max weight over the second copy's queries and the query heads of its group."""
    model = tiny_model(family, "eager")
    n = ids.shape[1]
    sequence = torch.cat([ids, torch.tensor([PROMPT]), ids], dim=1)
    with torch.no_grad():
        attentions = model(sequence, output_attentions=True).attentions
    kv_heads = model.config.num_key_value_heads
    result = {}
    for module in attention_modules(model):
        if is_full_attention_layer(module):
            weights = attentions[module.layer_idx][:, :, n + len(PROMPT) :, :n]  # (batch, heads, n, n)
            batch, heads = weights.shape[:2]
            result[module.layer_idx] = weights.amax(dim=2).view(batch, kv_heads, heads // kv_heads, n).amax(dim=2)
    return result


def test_scores_are_the_reconstruction_attention(family):
    ids = random_ids(1, SEQ)
    scores, _ = scores_of(tiny_model(family), ids, chunk_size=13)
    expected = brute_force_scores(family, ids)
    assert scores.keys() == expected.keys()
    for index in scores:
        torch.testing.assert_close(scores[index], expected[index], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_rows, chunk_size", [(3, 13), (5, 3), (1, 64)])
def test_scoring_in_small_query_blocks_is_the_reconstruction_attention(monkeypatch, block_rows, chunk_size):
    """Blocks of queries that end inside the causal triangle, chunks shorter than the repeat prompt."""
    monkeypatch.setattr("adakv.kernels.kvzip_reference.SCORING_BLOCK_ROWS", block_rows)
    ids = random_ids(1, SEQ)
    scores, _ = scores_of(tiny_model("llama"), ids, chunk_size=chunk_size)
    expected = brute_force_scores("llama", ids)
    for index in scores:
        torch.testing.assert_close(scores[index], expected[index], rtol=1e-4, atol=1e-6)


def test_chunked_reconstruction_equals_one_chunk():
    model, ids = tiny_model("qwen3"), random_ids(2, SEQ, seed=4)
    whole, _ = scores_of(model, ids, chunk_size=1000)
    for chunk_size in (1, 7, SEQ):
        chunked, _ = scores_of(model, ids, chunk_size)
        for index in whole:
            torch.testing.assert_close(chunked[index], whole[index], rtol=1e-5, atol=1e-7)


def test_scores_ignore_the_contexts_own_queries():
    """The context's own queries come from its recorded hidden states: poisoning them with NaN leaves
    the scores unchanged, so only the reconstruction's queries are read."""
    model, ids = tiny_model("llama"), random_ids(1, SEQ)
    scores, dense = scores_of(model, ids, chunk_size=16)
    for context in dense.contexts:  # the scorer must not read what the context's queries came from
        context.hidden_states.fill_(float("nan"))
    prefill = engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids)
    again = reconstruction_scores(prefill, PROMPT, 16)
    for index in scores:
        assert torch.equal(again[index], scores[index])


@pytest.mark.parametrize("wrap", ["alone", "adaptive_layer", "adaptive_model"])
def test_evict_matches_mask(family, wrap):
    model = tiny_model(family)
    make = {
        "alone": lambda backend: kvzip(0.6, backend=backend, budget_scope="head"),
        "adaptive_layer": lambda backend: AdaptivePress(kvzip(0.6, backend=None), backend=backend),
        "adaptive_model": lambda backend: AdaptivePress(kvzip(0.6, backend=None), scope="model", backend=backend),
    }[wrap]
    mask_run = run(model, make("mask"), random_ids(1, SEQ))
    assert_backends_agree(mask_run, run(model, make("evict"), random_ids(1, SEQ)))
    mask_cache = mask_run[1]
    if wrap == "alone":  # uniform: every head its own (1 - ratio) share
        for layer in compressed_layers(mask_cache).values():
            assert (layer.context_keep.sum(-1) == round(SEQ * 0.4)).all()


def test_press_keeps_the_best_reconstruction_scores_and_leaves_no_reconstruction_tokens():
    model, ids = tiny_model("llama"), random_ids(1, SEQ)
    scores, _ = scores_of(model, ids, chunk_size=16)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kvzip(0.75, budget_scope="head")(model):
        model(ids, past_key_values=cache)
        assert cache.get_seq_length() == SEQ
        for index, layer in compressed_layers(cache).items():
            best = scores[index].topk(SEQ // 4, dim=-1).indices
            assert layer.context_keep.gather(-1, best).all()
            assert layer.keys.shape[-2] == SEQ


def test_fast_path_reuses_one_scoring_for_every_ratio_and_matches_the_hooks():
    model, ids = tiny_model("gemma3"), random_ids(1, SEQ)
    dense = engine.dense_prefill(model, ids)
    for ratio in (0.25, 0.5):
        press = AdaptivePress(kvzip(ratio), scope="model")
        with press(model):
            fast = kept_token_counts(engine.compressed_cache(dense, press))
            hooked = kept_token_counts(engine.prefill(model, ids))
        assert fast.keys() == hooked.keys() == {2}
        assert torch.equal(fast[2], hooked[2])
    assert len(dense.memo) == 1


def test_registry_names():
    for name in ("kvzip", "adakv_kvzip", "adakv_model_kvzip"):
        press = registry.build_press(name, 0.5, backend="evict")
        assert press.compresses_after_prefill and press.compression_ratio == 0.5
    assert registry.build_press("adakv_model_kvzip", 0.5).scope == "model"


@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: AdaptivePress(p, scope="model")])
def test_pipeline_answers_with_both_backends(wrap):
    model, tokenizer = tiny_pair("llama")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    answers = []
    for backend in ("mask", "evict"):
        cache = DynamicCache()
        press = wrap(KVzipPress(0.5, chunk_size=32))
        press.backend = backend
        answers.append(pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=8, cache=cache)["answers"])
        assert kept_token_counts(cache)
    assert answers[0] == answers[1]


def test_refusals():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        with KVzipPress(0.5)(model), torch.no_grad():
            model(random_ids(1, SEQ), past_key_values=DynamicCache(config=model.config))
    press = kvzip(0.5)
    with press(model), pytest.raises(ValueError, match="whole context prefill"):
        prefill_in_chunks(model, press, random_ids(1, SEQ), chunk_size=16)
    ids = random_ids(2, SEQ)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with press(model), torch.no_grad(), pytest.raises(ValueError, match="padded batch"):
        model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config))
    with ChunkPress(kvzip(0.5), chunk_length=8)(model), torch.no_grad(), pytest.raises(ValueError, match="ChunkPress"):
        model(random_ids(1, SEQ), past_key_values=DynamicCache(config=model.config))
    for bad in (dict(chunk_size=0), dict(repeat_prompt_ids=(1, -2))):
        with pytest.raises((ValueError, TypeError)):
            KVzipPress(0.5, **bad)
