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
