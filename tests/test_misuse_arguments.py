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
