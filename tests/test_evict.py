"""Backend "evict" (flattened head-wise cache) gives the same results as backend "mask"."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache

from adakv import presses as P
from adakv import kept_token_counts, rollback
from adakv.cache import MaskedLayer, compressed_layers
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.presses.wrappers.criticalkv import CriticalKVPress

PRESSES = {
    "snapkv": lambda backend: P.SnapKVPress(0.5, window_size=8, backend=backend),
    "adaptive_snapkv": lambda backend: P.AdaptivePress(P.SnapKVPress(0.6, window_size=8), backend=backend),
    "knorm": lambda backend: P.KnormPress(0.5, backend=backend),
    "streaming_llm": lambda backend: P.StreamingLLMPress(0.7, backend=backend),
    "tova": lambda backend: P.TOVAPress(0.4, backend=backend),
    "adaptive_criticalkv": lambda backend: P.AdaptivePress(
        CriticalKVPress(P.SnapKVPress(0.5, window_size=8)), backend=backend
    ),
    "pyramidkv": lambda backend: P.PyramidKVPress(0.5, window_size=8, backend=backend),
    "lagkv": lambda backend: P.LagKVPress(0.6, n_sink=2, lag_size=8, backend=backend),
    "simlayerkv": lambda backend: P.SimLayerKVPress(0.6, lazy_threshold=0.3, n_last=8, backend=backend),
    "block_snapkv": lambda backend: P.BlockPress(P.SnapKVPress(0.5, window_size=8), block_size=12, backend=backend),
    "chunkkv_snapkv": lambda backend: P.ChunkKVPress(P.SnapKVPress(0.5, window_size=8), chunk_length=4, backend=backend),
}
FAMILY_PRESSES = ("snapkv", "adaptive_snapkv")


def left_padded_batch(seq_len: int = 40, pad: int = 9):
    ids = random_ids(2, seq_len, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    attention_mask[1, :pad] = 0
    return ids, attention_mask


def run(model, press, ids, attention_mask=None, question_length=5, decode_steps=4, question_padding=None):
    """Prefill the context with `press`, then a question (multi-token append) and a few greedy steps.
    question_padding: (batch,) left padding of each row's question (a question batch padded to one length).
    Returns the list of last-position logits of every forward and the cache."""
    cache = DynamicCache(config=model.config)
    generator = torch.Generator().manual_seed(7)
    question = torch.randint(3, model.config.vocab_size, (ids.shape[0], question_length), generator=generator)
    question = question.to(ids.device)
    question_mask = torch.ones_like(question)
    if question_padding is not None:
        positions = torch.arange(question_length, device=ids.device)
        question_mask = (positions[None, :] >= question_padding.to(ids.device)[:, None]).long()
        attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    logits = []
    with torch.no_grad(), press(model):
        mask = attention_mask
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        next_ids = question
        for step in range(decode_steps + 1):
            if mask is not None:
                mask = torch.cat([mask, question_mask if step == 0 else torch.ones_like(next_ids)], dim=1)
            out = model(next_ids, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits[:, -1])
            next_ids = out.logits[:, -1:].argmax(-1)
    return logits, cache


def assert_same_run(model, press_name, ids, attention_mask=None, question_padding=None):
    mask_logits, mask_cache = run(model, PRESSES[press_name]("mask"), ids, attention_mask, question_padding=question_padding)
    evict_logits, evict_cache = run(model, PRESSES[press_name]("evict"), ids, attention_mask, question_padding=question_padding)
    layers = compressed_layers(evict_cache)
    assert layers and all(isinstance(layer, FlatHeadwiseLayer) for layer in layers.values())
    assert all(isinstance(layer, MaskedLayer) for layer in compressed_layers(mask_cache).values())
    for step, (expected, actual) in enumerate(zip(mask_logits, evict_logits)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward {step}: {m}")
    mask_counts, evict_counts = kept_token_counts(mask_cache), kept_token_counts(evict_cache)
    assert mask_counts.keys() == evict_counts.keys()
    # the mask backend counts a padded question's padding positions too; evict never stores them
    for index in mask_counts:
        unstored = 0 if question_padding is None else question_padding[:, None].to(evict_counts[index].device)
        assert torch.equal(mask_counts[index] - unstored, evict_counts[index])


@pytest.mark.parametrize("press_name", FAMILY_PRESSES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_evict_matches_mask_on_every_family(family, press_name, attn_implementation):
    model = tiny_model(family, attn_implementation)
    assert_same_run(model, press_name, random_ids(1, 48))


@pytest.mark.parametrize("press_name", FAMILY_PRESSES)
def test_evict_matches_mask_with_left_padding(family, press_name):
    model = tiny_model(family)
    ids, attention_mask = left_padded_batch()
    assert_same_run(model, press_name, ids, attention_mask)


@pytest.mark.parametrize("press_name", sorted(set(PRESSES) - set(FAMILY_PRESSES)))
def test_evict_matches_mask_for_other_presses(press_name):
    model = tiny_model("llama")
    assert_same_run(model, press_name, random_ids(1, 48))
    ids, attention_mask = left_padded_batch()
    assert_same_run(model, press_name, ids, attention_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_evict_matches_mask_in_half_precision(dtype):
    model = tiny_model("qwen2").to(dtype)
    mask_logits, _ = run(model, PRESSES["adaptive_snapkv"]("mask"), random_ids(1, 48))
    evict_logits, cache = run(model, PRESSES["adaptive_snapkv"]("evict"), random_ids(1, 48))
    assert all(layer.keys.dtype == dtype for layer in compressed_layers(cache).values())
    for expected, actual in zip(mask_logits, evict_logits):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05)


def test_generate_gives_the_same_greedy_answer():
    model = tiny_model("llama")
    ids, attention_mask = left_padded_batch()
    answers = {}
    for backend in ("mask", "evict"):
        with torch.no_grad(), PRESSES["adaptive_snapkv"](backend)(model):
            answers[backend] = model.generate(
                ids,
                attention_mask=attention_mask,
                past_key_values=DynamicCache(config=model.config),
                max_new_tokens=10,
                do_sample=False,
                pad_token_id=0,
            )
    assert torch.equal(answers["mask"], answers["evict"])


def test_evict_frees_memory_and_rolls_back():
    model = tiny_model("llama")
    ids = random_ids(1, 200)
    press = P.SnapKVPress(0.75, window_size=8, backend="evict")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        layers = compressed_layers(cache)
        config = model.config
        dense_bytes = 2 * 200 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
        for layer in layers.values():
            kept = int(layer.kept_counts().sum())
            assert kept == 50 * config.num_key_value_heads
            assert layer.kv_bytes() == (kept + layer.slack * layer.num_sequences) * layer.row_bytes
            assert layer.kv_bytes() <= 0.25 * dense_bytes + layer.slack * layer.num_sequences * layer.row_bytes
        before = model(random_ids(1, 6, seed=5), past_key_values=cache).logits
        assert cache.get_seq_length() == 206
        rollback(cache, 200)
        assert cache.get_seq_length() == 200
        again = model(random_ids(1, 6, seed=5), past_key_values=cache).logits
        torch.testing.assert_close(again, before)
        with pytest.raises(ValueError, match="compressed context holds 200"):
            rollback(cache, 150)


def test_evict_cache_outside_the_press_is_refused():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with P.SnapKVPress(0.5, window_size=8, backend="evict")(model):
            model(random_ids(1, 40), past_key_values=cache)
        with pytest.raises(RuntimeError, match="backend 'evict'"):
            model(random_ids(1, 1), past_key_values=cache)


def test_batch_mismatch_with_the_cache_is_refused():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), P.SnapKVPress(0.5, window_size=8, backend="evict")(model):
        model(random_ids(2, 40), past_key_values=cache)
        with pytest.raises(ValueError, match="batch=3.*batch=2"):
            model(random_ids(3, 1), past_key_values=cache)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padded_question_batch_matches_mask(family, attn_implementation):
    """Questions of different lengths padded on the left on top of a left-padded context batch: evict
    stores no padding row and gives the mask backend's logits."""
    model = tiny_model(family, attn_implementation)
    ids, attention_mask = left_padded_batch()
    assert_same_run(model, "adaptive_snapkv", ids, attention_mask, question_padding=torch.tensor([0, 3]))


def test_a_padded_question_mask_is_analysed_once_per_forward(monkeypatch):
    """Every layer of a forward gets the same mask: its padding is worked out (one host sync on a GPU) once."""
    from adakv.runtimes.hf import attention

    calls = []
    original = attention.appended_left_padding
    monkeypatch.setattr(attention, "appended_left_padding", lambda *args: calls.append(args) or original(*args))
    model = tiny_model("llama")
    ids, attention_mask = left_padded_batch()
    run(model, PRESSES["adaptive_snapkv"]("evict"), ids, attention_mask, question_padding=torch.tensor([0, 3]))
    assert len(calls) == 1  # the question's forward; one-token decode steps need no analysis
    assert model.config.num_hidden_layers > 1


def test_right_padded_question_is_refused():
    model = tiny_model("llama")
    ids, attention_mask = left_padded_batch()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), P.SnapKVPress(0.5, window_size=8, backend="evict")(model):
        model(ids, attention_mask=attention_mask, past_key_values=cache)
        question = random_ids(2, 4)
        question_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        with pytest.raises(NotImplementedError, match="left padding followed by real tokens"):
            model(question, attention_mask=torch.cat([attention_mask, question_mask], 1), past_key_values=cache)


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'mask', 'evict'"):
        P.SnapKVPress(0.5, backend="paged")
