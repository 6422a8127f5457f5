"""Every public entry point checks its arguments (issue 22): a misspelt press field, a wrong type or value for
a press, `press(model)`, the cache helpers, `prefill_in_chunks`, `accelerate` or the pipeline raises a
TypeError / ValueError / AttributeError naming the argument, what was given and what is allowed, before
anything runs; and combinations that would run and give a wrong or ignored result are refused."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch
from transformers import DynamicCache

import adakv as P

from conftest import random_ids, tiny_model
from test_numeric_fields import PRESS_CLASSES, make


def misspelt(name: str) -> str:
    """`name` with one letter dropped (compression_ratio -> compresion_ratio)."""
    middle = len(name) // 2
    return name[:middle] + name[middle + 1 :]


# --- misspelt attributes -----------------------------------------------------------------------------------------

FIELD_CASES = [
    (press_class, field.name) for press_class in PRESS_CLASSES if dataclasses.is_dataclass(press_class)
    for field in dataclasses.fields(press_class)
]


@pytest.mark.parametrize("press_class, name", FIELD_CASES, ids=[f"{c.__name__}.{n}" for c, n in FIELD_CASES])
def test_a_misspelt_field_is_refused_naming_it_and_the_valid_ones(press_class, name):
    press = make(press_class)
    typo = misspelt(name)
    with pytest.raises(AttributeError) as error:
        setattr(press, typo, getattr(press, name))
    message = str(error.value)
    assert f"{press_class.__name__} has no field {typo!r}" in message
    assert name in message.split("fields:")[1]
    assert typo not in vars(press)


def test_the_message_suggests_the_nearest_field():
    press = P.SnapKVPress(0.5)
    with pytest.raises(AttributeError, match=r"Did you mean 'compression_ratio'\?"):
        press.compresion_ratio = 0.9
    assert press.compression_ratio == 0.5


def test_a_wrapper_refuses_a_misspelt_field_and_lists_its_ratio_property():
    press = P.AdaptivePress(P.SnapKVPress(0.5))
    with pytest.raises(AttributeError, match=r"'alpha_safegaurd'.*Did you mean 'alpha_safeguard'.*compression_ratio"):
        press.alpha_safegaurd = 0.5
    press.compression_ratio = 0.25  # a property with a setter is a field too
    assert press.press.compression_ratio == 0.25


def test_declared_names_stay_settable():
    press = P.SnapKVPress(0.5)
    press.score = lambda context: None  # a method replaced (tests do this)
    copy = dataclasses.replace(press, compression_ratio=0.25)  # replace, copy and pickle build presses too
    assert copy.compression_ratio == 0.25


# --- combinations that would run and give a wrong or ignored result ---------------------------------------------


def decoding_press():
    return P.DecodingPress(P.KnormPress(), compression_interval=2, target_size=8, hidden_states_buffer_size=8)


HOLDERS = {
    "KeyRerotationPress": lambda inner: P.KeyRerotationPress(inner),
    "ChunkPress": lambda inner: P.ChunkPress(inner, chunk_length=8),
    "MergePress": lambda inner: P.MergePress(inner),
    "ThinKPress": lambda inner: P.ThinKPress(inner),
    "ComposedPress": lambda inner: P.ComposedPress([P.KnormPress(0.25), inner]),
    "PrefillDecodingPress.prefill_press": lambda inner: P.PrefillDecodingPress(inner, decoding_press()),
}
DECODING_INNERS = {
    "DecodingPress": decoding_press,
    "PrefillDecodingPress": lambda: P.PrefillDecodingPress(P.KnormPress(0.5), decoding_press()),
}


@pytest.mark.parametrize("inner", sorted(DECODING_INNERS))
@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_a_press_that_compresses_during_decoding_is_refused_inside_a_wrapper(holder, inner):
    with pytest.raises(TypeError, match=f"cannot hold a {inner}: .*would\\s+never run.*PrefillDecodingPress"):
        HOLDERS[holder](DECODING_INNERS[inner]())


def test_a_decoding_press_put_into_a_composed_press_later_is_refused_when_the_block_opens():
    model, press = tiny_model("llama"), P.ComposedPress([P.KnormPress(0.5)])
    press.presses.append(decoding_press())
    with pytest.raises(TypeError, match="ComposedPress cannot hold a DecodingPress"):
        with press(model):
            pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("holder", ["KeyRerotationPress", "MergePress", "ThinKPress"])
def test_key_rerotation_is_refused_inside_any_wrapper(holder):
    inner = P.KeyRerotationPress(P.KnormPress(0.5))
    with pytest.raises(TypeError, match=f"{holder} cannot (hold|wrap) a KeyRerotationPress"):
        HOLDERS[holder](inner)


def test_key_rerotation_may_be_the_prefill_press_and_the_outermost_press():
    P.PrefillDecodingPress(P.KeyRerotationPress(P.KnormPress(0.5)), decoding_press())
    P.KeyRerotationPress(P.MergePress(P.KnormPress(0.5)))
    P.KeyRerotationPress(P.ComposedPress([P.KnormPress(0.5), P.SnapKVPress(0.5)]))


def test_rerotating_twice_is_refused():
    with pytest.raises(TypeError, match="use one KeyRerotationPress, outermost"):
        P.KeyRerotationPress(P.KeyRerotationPress(P.KnormPress(0.5)))


# --- press(model) and accelerate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["model", None, torch.nn.Linear(2, 2)], ids=["str", "None", "module-without-config"])
def test_press_of_something_that_is_not_a_model_is_refused_at_the_call(model):
    with pytest.raises(TypeError, match=r"SnapKVPress\(\.\.\.\)\(model\) takes a transformers model.*got"):
        P.SnapKVPress(0.5)(model)


@pytest.mark.parametrize(
    "switches, error, message",
    [
        ({"bogus": False}, TypeError, r"unknown speed switch\(es\) \['bogus'\]; the switches are \['cuda_graphs'"),
        ({"cuda_grpahs": True}, TypeError, r"unknown speed switch\(es\) \['cuda_grpahs'\]"),
        ({"join_projections": 1}, TypeError, r"join_projections must be one of \(False, True\), got 1 \(int\)"),
        ({"cuda_graphs": "yes"}, ValueError, r"cuda_graphs must be one of \(False, True, 'emulate'\), got 'yes'"),
        ({"gemv_linears": None}, TypeError, r"gemv_linears must be one of \(False, True\), got None"),
    ],
)
def test_press_of_a_model_checks_the_speed_switches_at_the_call(switches, error, message):
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        P.SnapKVPress(0.5)(model, **switches)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "call",
    [lambda model: P.accelerate("model"), lambda model: P.accelerate(model, join_projections="yes"),
     lambda model: P.accelerate(model, fuse_elementwise=1)],
    ids=["not-a-model", "str-switch", "int-switch"],
)
def test_accelerate_checks_its_arguments_at_the_call(call):
    with pytest.raises(TypeError, match="accelerate: |accelerate takes a transformers model"):
        call(tiny_model("llama"))


def test_a_press_block_never_entered_warns_that_nothing_was_compressed():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"SnapKVPress\(\.\.\.\)\(model\) was called but never entered"):
        P.SnapKVPress(0.5)(model)
        gc.collect()
    assert model.config._attn_implementation == "sdpa"


def test_an_entered_press_block_does_not_warn_and_cannot_be_entered_twice():
    model, ids = tiny_model("llama"), random_ids(seq_len=16)
    block = P.SnapKVPress(0.5)(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), block:
            cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="entered already; a block opens once. Call press\\(model\\) again"):
            with block:
                pass
        del block
        gc.collect()
    assert P.kept_token_counts(cache)[0].tolist() == [[8, 8]]


# --- cache helpers ------------------------------------------------------------------------------------------------

from adakv.cache import checkpoint, restore  # noqa: E402


@pytest.mark.parametrize("helper", ["kept_token_counts", "checkpoint"])
@pytest.mark.parametrize("cache", [None, "cache", [1]], ids=["None", "str", "list"])
def test_cache_helpers_refuse_what_is_not_a_cache(helper, cache):
    function = {"kept_token_counts": P.kept_token_counts, "checkpoint": checkpoint}[helper]
    with pytest.raises(TypeError, match=f"{helper} takes a transformers Cache.*got"):
        function(cache)


@pytest.mark.parametrize(
    "seq_len, error", [(-1, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_rollback_refuses_a_negative_or_non_integer_length(seq_len, error):
    model = tiny_model("llama")
    with torch.no_grad():
        cache = model(random_ids(seq_len=8), use_cache=True).past_key_values
    with pytest.raises(error, match=r"rollback: seq_len must be an integer >= 0, got"):
        P.rollback(cache, seq_len)
    assert cache.get_seq_length() == 8  # a negative count used to cut from the end, like a slice


def test_rollback_takes_numpy_integers_and_restore_refuses_what_is_not_a_checkpoint():
    import numpy as np

    model = tiny_model("llama")
    with torch.no_grad():
        cache = model(random_ids(seq_len=8), use_cache=True).past_key_values
    P.rollback(cache, np.int64(5))
    assert cache.get_seq_length() == 5
    with pytest.raises(TypeError, match=r"restore: saved must be what adakv.cache.checkpoint\(cache\) returned"):
        restore(cache, 5)
    with pytest.raises(TypeError, match="rollback takes a transformers Cache"):
        P.rollback("cache", 2)


# --- prefill_in_chunks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (lambda model, ids: ("model", None, ids, 4), TypeError, "prefill_in_chunks takes a transformers model"),
        (lambda model, ids: (model, None, ids.float(), 4), TypeError, "input_ids must hold integer token ids, got a torch.float32"),
        (lambda model, ids: (model, None, ids + 1000, 4), ValueError, r"token ids in \[0, 128\).*from 10\d\d to"),
        (lambda model, ids: (model, None, ids - 200, 4), ValueError, r"token ids in \[0, 128\)"),
        (lambda model, ids: (model, None, ids[0], 4), TypeError, "2-D tensor of token ids.*got a 1-D tensor"),
        (lambda model, ids: (model, None, ids.tolist(), 4), TypeError, r"2-D tensor of token ids.*\(list\)"),
        (lambda model, ids: (model, None, ids, 2.0), ValueError, "chunk_size must be an integer >= 1, got 2.0"),
    ],
    ids=["model", "float-ids", "ids-above-vocabulary", "negative-ids", "1-D", "list", "float-chunk"],
)
def test_prefill_in_chunks_checks_its_arguments(arguments, error, message):
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        P.prefill_in_chunks(*arguments(model, random_ids(seq_len=16)))


def test_prefill_in_chunks_takes_a_numpy_chunk_size():
    import numpy as np

    model = tiny_model("llama")
    assert P.prefill_in_chunks(model, None, random_ids(seq_len=16), np.int64(4)).get_seq_length() == 16


# --- the pipeline -------------------------------------------------------------------------------------------------

from transformers import pipeline  # noqa: E402

from adakv.pipeline import TASK  # noqa: E402
from test_pipeline import CONTEXT, QUESTIONS, tiny_pair  # noqa: E402


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"answer_prefix": 3}, TypeError, r"answer_prefix must be a str.*got 3 \(int\)"),
        ({"join_projections": 1}, TypeError, r"kv-press-text-generation: join_projections must be one of \(False, True\)"),
        ({"cuda_graphs": "yes"}, ValueError, "cuda_graphs must be one of"),
        ({"max_new_tokens": 2.0}, TypeError, r"max_new_tokens must be a positive int, got 2.0 \(float\)"),
        ({"max_context_length": "10"}, TypeError, "max_context_length must be a positive int or None, got '10'"),
        ({"max_context_length": 0}, ValueError, "max_context_length must be a positive int or None, got 0"),
    ],
)
def test_the_pipeline_checks_its_arguments(arguments, error, message):
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    with pytest.raises(error, match=message):
        pipe(CONTEXT, question=QUESTIONS[0], **{"max_new_tokens": 2, **arguments})


def test_the_pipeline_takes_numpy_integers():
    import numpy as np

    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    press = P.SnapKVPress(0.5, window_size=4)
    expected = pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=3, prefill_chunk_size=16)
    numpy = pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=np.int64(3), prefill_chunk_size=np.int32(16))
    assert numpy == expected


# --- found by trying things as a new user would ----------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["abc", 5])
def test_kvzip_refuses_a_tokenizer_that_is_not_one(tokenizer):
    with pytest.raises(TypeError, match=r"KVzipPress's tokenizer must be the model's tokenizer.*or None"):
        P.KVzipPress(0.5, tokenizer=tokenizer)
    press = P.KVzipPress(0.5)
    with pytest.raises(TypeError, match="tokenizer must be"):  # used to fail inside the press: 'str' is not callable
        press.tokenizer = tokenizer


def test_recording_press_contexts_must_be_a_list():
    with pytest.raises(TypeError, match=r"RecordingPress.contexts must be a list"):
        P.RecordingPress().contexts = 5


def test_generate_given_a_cache_longer_than_its_ids_says_what_to_pass():
    model, ids = tiny_model("llama"), random_ids(seq_len=16)
    cache = DynamicCache()
    with torch.no_grad(), P.KnormPress(0.5)(model):
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"0 tokens.*generate\(\) given a cache feeds only the input_ids after"):
            model.generate(ids[:, :4], past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
