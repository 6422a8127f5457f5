"""Misuses inside a press block that used to compress nothing, or the wrong tokens, without a word (issue 22):
each now raises a clear error (or warns) naming what to do instead, and leaves the model as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, StaticCache, pipeline
from transformers.cache_utils import QuantizedCache

import adakv as P
from adakv import kept_token_counts
from adakv.pipeline import TASK

from conftest import random_ids, tiny_model
from test_pipeline import CONTEXT, QUESTIONS, tiny_pair

BACKENDS = ["mask", "evict"]


def press_of(backend: str = "evict"):
    return P.SnapKVPress(0.5, window_size=4, backend=backend)


def assert_model_restored(model) -> None:
    assert model.config._attn_implementation == "sdpa"
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert "generate" not in vars(model)


def padded(ids: torch.Tensor, pads: list[int], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` (batch, seq) with row i's first (left) or last (right) pads[i] tokens made padding (id 0)."""
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, count in enumerate(pads):
        if count:
            where = slice(0, count) if side == "left" else slice(ids.shape[1] - count, None)
            ids[row, where], mask[row, where] = 0, 0
    return ids, mask


# --- right padding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_right_padded_batch_is_refused_naming_padding_side(backend):
    model = tiny_model("llama")
    ids, mask = padded(random_ids(batch=3, seq_len=24), [0, 6, 0], "right")
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] of this batch are padded on the right.*padding_side = 'left'"):
        with torch.no_grad(), press_of(backend)(model):
            model(ids, attention_mask=mask, use_cache=True)
    assert_model_restored(model)


def test_right_padding_is_refused_by_generate_too():
    model = tiny_model("llama")
    ids, mask = padded(random_ids(batch=2, seq_len=24), [5, 0], "right")
    with pytest.raises(ValueError, match="padded on the right"):
        with torch.no_grad(), press_of()(model):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_left_padded_batch_is_compressed(backend):
    model = tiny_model("llama")
    ids, mask = padded(random_ids(batch=2, seq_len=24), [6, 0], "left")
    with torch.no_grad(), press_of(backend)(model):
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert kept_token_counts(cache)[0].tolist() == [[9, 9], [12, 12]]


# --- caches other than DynamicCache ---------------------------------------------------------------------------


def static_cache(model) -> StaticCache:
    return StaticCache(config=model.config, max_cache_len=64)


def test_a_static_cache_given_to_the_model_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="compress a transformers DynamicCache, but got a StaticCache.*DynamicCache()"):
        with torch.no_grad(), press_of()(model):
            model(random_ids(seq_len=24), past_key_values=static_cache(model), use_cache=True)
    assert_model_restored(model)


@pytest.mark.parametrize(
    "generate_kwargs",
    [
        lambda model: {"past_key_values": static_cache(model)},
        lambda model: {"cache_implementation": "static"},
        lambda model: {"generation_config": GenerationConfig(cache_implementation="static", max_new_tokens=2)},
    ],
    ids=["static_cache", "cache_implementation", "generation_config"],
)
def test_generate_with_a_static_cache_is_refused_up_front(generate_kwargs):
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match="(StaticCache|cache_implementation='static').*Pass no cache"):
        with torch.no_grad(), press_of()(model):
            model.generate(random_ids(seq_len=24), max_new_tokens=2, do_sample=False, **generate_kwargs(model))
    assert forwards == []


def test_a_generation_config_asking_for_a_static_cache_is_refused():
    model = tiny_model("llama")
    model.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        with torch.no_grad(), press_of()(model):
            model.generate(random_ids(seq_len=24), max_new_tokens=2, do_sample=False)


def test_a_quantized_cache_is_refused():
    model = tiny_model("llama")
    cache = QuantizedCache(backend="fp8", config=model.config)
    with pytest.raises(ValueError, match="but got a QuantizedCache"):
        with torch.no_grad(), press_of()(model):
            model(random_ids(seq_len=24), past_key_values=cache, use_cache=True)


def offloading_cache(model, monkeypatch) -> DynamicCache:
    """A DynamicCache(offloading=True): on CPU its prefetch stream cannot be made, so a stand-in is used (the
    press refuses the cache before any forward reaches the stream)."""
    monkeypatch.setattr(torch, "Stream", lambda *args, **kwargs: None)
    cache = DynamicCache(config=model.config, offloading=True)
    assert cache.offloading
    return cache


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_an_offloading_dynamic_cache_is_refused(call, monkeypatch):
    model = tiny_model("llama")
    cache = offloading_cache(model, monkeypatch)
    with pytest.raises(ValueError, match=r"offloading cache \(DynamicCache\(offloading=True\).*SnapKVPress.*without offloading"):
        with torch.no_grad(), press_of()(model):
            if call == "forward":
                model(random_ids(seq_len=24), past_key_values=cache, use_cache=True)
            else:
                model.generate(random_ids(seq_len=24), past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert cache.get_seq_length() == 0
    assert_model_restored(model)


@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_generate_with_an_offloaded_cache_implementation_is_refused_up_front(where):
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    kwargs = {"cache_implementation": "offloaded"}
    if where == "generation_config":
        kwargs = {"generation_config": GenerationConfig(cache_implementation="offloaded", max_new_tokens=2)}
    with pytest.raises(ValueError, match="cache_implementation='offloaded'.*not built to be offloaded"):
        with torch.no_grad(), press_of()(model):
            model.generate(random_ids(seq_len=24), max_new_tokens=2, do_sample=False, **kwargs)
    assert forwards == []


def test_the_pipeline_refuses_an_offloading_cache_with_a_press(monkeypatch):
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="cache: An offloading cache"):
        pipe(CONTEXT, question=QUESTIONS[0], press=press_of(), cache=offloading_cache(model, monkeypatch), max_new_tokens=2)


def test_a_dynamic_cache_given_explicitly_is_compressed():
    model = tiny_model("llama")
    cache = DynamicCache()
    with torch.no_grad(), press_of()(model):
        model.generate(random_ids(seq_len=24), past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert kept_token_counts(cache)[0].tolist() == [[12 + 1, 12 + 1]]  # the context's half and one decode step


def test_the_pipeline_refuses_a_static_cache_with_a_press():
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="cache: adakv presses compress a transformers DynamicCache, but got a StaticCache"):
        pipe(CONTEXT, question=QUESTIONS[0], press=press_of(), cache=static_cache(model), max_new_tokens=2)


@pytest.mark.parametrize("max_new_tokens", [True, False])
def test_the_pipeline_refuses_a_bool_for_max_new_tokens(max_new_tokens):
    model, tokenizer = tiny_pair()
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got"):
        pipeline(TASK, model=model, tokenizer=tokenizer)(CONTEXT, question=QUESTIONS[0], max_new_tokens=max_new_tokens)


# --- assisted generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generate_kwargs, name",
    [
        (lambda: {"assistant_model": tiny_model("llama", seed=1)}, "assistant_model"),
        (lambda: {"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
        (lambda: {"generation_config": GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=4)},
         "prompt_lookup_num_tokens"),
    ],
    ids=["assistant_model", "prompt_lookup", "generation_config"],
)
def test_assisted_generation_is_refused_up_front_naming_the_argument(generate_kwargs, name):
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=rf"Assisted generation \({name}\) cannot run inside a press block"):
        with torch.no_grad(), press_of()(model):
            model.generate(random_ids(seq_len=24), max_new_tokens=4, do_sample=False, **generate_kwargs())
    assert forwards == []
    assert "generate" not in vars(model)


def test_generate_works_again_after_the_block():
    model = tiny_model("llama")
    ids = random_ids(seq_len=24)
    with pytest.raises(ValueError):
        with torch.no_grad(), press_of()(model):
            model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=4, do_sample=False).shape == (1, 28)


# --- use_cache=False and output_attentions ---------------------------------------------------------------------


@pytest.mark.parametrize("call", ["forward", "generate", "generation_config"])
def test_use_cache_false_is_refused(call):
    model, ids = tiny_model("llama"), random_ids(seq_len=24)
    with pytest.raises(ValueError, match=r"keeps no cache \(use_cache=False\), so SnapKVPress has nothing to compress"):
        with torch.no_grad(), press_of()(model):
            if call == "forward":
                model(ids, use_cache=False)
            elif call == "generate":
                model.generate(ids, use_cache=False, max_new_tokens=2, do_sample=False)
            else:
                model.generate(ids, generation_config=GenerationConfig(use_cache=False, max_new_tokens=2))
    assert_model_restored(model)


def generate_with_attentions(backend: str) -> list[warnings.WarningMessage]:
    model = tiny_model("llama", "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), press_of(backend)(model):
            model.generate(random_ids(seq_len=24), output_attentions=True, return_dict_in_generate=True,
                           max_new_tokens=3, do_sample=False)  # fmt: skip
    return [w for w in caught if "output_attentions" in str(w.message)]


def test_output_attentions_under_evict_warns_once_that_decode_steps_return_none():
    caught = generate_with_attentions("evict")
    assert len(caught) == 1
    assert "return no attention weights" in str(caught[0].message) and "backend='mask'" in str(caught[0].message)


def test_output_attentions_under_mask_does_not_warn():
    assert generate_with_attentions("mask") == []


# --- a compressed cache read where it cannot be ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compressed_cache_continued_by_another_model_is_refused(backend):
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = random_ids(seq_len=24)
    with torch.no_grad(), press_of(backend)(model):
        cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="compressed by an adakv press for another model"):
        with torch.no_grad(), P.KnormPress(0.5)(other):
            other(ids[:, :1], past_key_values=cache, use_cache=True)
    assert_model_restored(other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compressed_cache_continued_outside_the_block_says_so(backend):
    model = tiny_model("llama")
    ids = random_ids(seq_len=24)
    with torch.no_grad(), press_of(backend)(model):
        cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(RuntimeError, match=r"outside a press block now \(it runs its own attn_implementation='sdpa'"):
        with torch.no_grad():
            model(ids[:, :1], past_key_values=cache, use_cache=True)
