"""Bad input to presses and wrappers: a clear ValueError/TypeError naming what is allowed."""

from __future__ import annotations

import re

import pytest
import torch

from adakv import (
    AdaptivePress,
    ChunkPress,
    ComposedPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    ObservedAttentionPress,
    PerLayerCompressionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from conftest import random_ids, tiny_model

from adakv import presses as P

SCORER_CLASSES = [
    SnapKVPress,
    PyramidKVPress,
    KnormPress,
    StreamingLLMPress,
    RandomPress,
    TOVAPress,
    ObservedAttentionPress,
    ExpectedAttentionPress,
    KeyDiffPress,
]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", None])
@pytest.mark.parametrize("press_class", SCORER_CLASSES, ids=lambda cls: cls.__name__)
def test_scorer_ratio_outside_0_1(press_class, ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press_class(compression_ratio=ratio)


@pytest.mark.parametrize(
    "make_wrapper",
    [
        lambda inner: AdaptivePress(inner),
        lambda inner: ChunkPress(inner),
        lambda inner: ComposedPress([inner]),
        lambda inner: ComposedPress([KnormPress(), inner]),
        lambda inner: PerLayerCompressionPress(inner, [0.5, 0.5, 0.5]),
        lambda inner: KeyRerotationPress(inner),
    ],
    ids=["adaptive", "chunk", "composed", "composed_second", "per_layer", "key_rerotation"],
)
@pytest.mark.parametrize("inner", [None, 0.5, "SnapKVPress", SnapKVPress], ids=["none", "float", "str", "class"])
def test_wrapper_around_something_that_is_not_a_press(make_wrapper, inner):
    with pytest.raises(TypeError, match="BasePress instance"):
        make_wrapper(inner)


def test_wrappers_that_need_a_scoring_press():
    not_scoring = ChunkPress(KnormPress(compression_ratio=0.5))
    with pytest.raises(TypeError, match="needs a scoring press"):
        PerLayerCompressionPress(not_scoring, [0.5, 0.5, 0.5])
    with pytest.raises(TypeError, match="needs a scoring press"):
        AdaptivePress(ComposedPress([KnormPress()]))


@pytest.mark.parametrize("wrapper", [lambda p: ChunkPress(p), lambda p: ComposedPress([KnormPress(), p])])
def test_key_rerotation_must_be_outermost(wrapper):
    with pytest.raises(TypeError, match="Wrap the .* in the KeyRerotationPress instead"):
        wrapper(KeyRerotationPress(KnormPress(compression_ratio=0.5)))


@pytest.mark.parametrize("presses", [[], None, KnormPress()])
def test_composed_press_needs_a_non_empty_list(presses):
    with pytest.raises(TypeError, match="non-empty list of presses"):
        ComposedPress(presses)


@pytest.mark.parametrize("chunk_length", [0, -1, 2.5, "16", True])
def test_chunk_length(chunk_length):
    with pytest.raises(ValueError, match="chunk_length must be an integer >= 1"):
        ChunkPress(KnormPress(), chunk_length=chunk_length)


@pytest.mark.parametrize("ratios, index", [([0.5, 1.0, 0.5], 1), ([-0.1, 0.5, 0.5], 0), ([0.5, 0.5, "0.5"], 2)])
def test_per_layer_ratios_outside_0_1(ratios, index):
    with pytest.raises(ValueError, match=rf"compression_ratios\[{index}\] must be a number in \[0, 1\)"):
        PerLayerCompressionPress(SnapKVPress(), ratios)


@pytest.mark.parametrize("ratios", [[], None, 0.5])
def test_per_layer_ratios_not_a_list(ratios):
    with pytest.raises(TypeError, match="one per layer"):
        PerLayerCompressionPress(SnapKVPress(), ratios)


@pytest.mark.parametrize("ratios", [[0.5, 0.5], [0.5] * 4])
def test_per_layer_ratios_of_the_wrong_length_fail_at_compression(ratios):
    model = tiny_model("llama")  # 3 layers
    press = PerLayerCompressionPress(KnormPress(), ratios)
    with pytest.raises(ValueError, match=f"got {len(ratios)} compression_ratios but the model has 3 layers"):
        with torch.no_grad(), press(model):
            model(random_ids(seq_len=16))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.2"])
def test_adaptive_alpha_outside_0_1(alpha):
    with pytest.raises(ValueError, match=r"alpha_safeguard must be a number in \[0, 1\]"):
        AdaptivePress(KnormPress(), alpha_safeguard=alpha)


@pytest.mark.parametrize("beta", [0.5, 0, -2, "20", True])
def test_pyramid_beta(beta):
    with pytest.raises(ValueError, match="beta must be a number >= 1"):
        PyramidKVPress(beta=beta)


@pytest.mark.parametrize("n_sink", [-1, 2.0, "4", None])
def test_streaming_llm_n_sink(n_sink):
    with pytest.raises(ValueError, match="n_sink must be an integer >= 0"):
        StreamingLLMPress(n_sink=n_sink)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_random_seed(seed):
    with pytest.raises(ValueError, match="seed must be None or an integer >= 0"):
        RandomPress(seed=seed)


@pytest.mark.parametrize(
    "field, value, minimum",
    [("n_future_positions", 0, 1), ("n_recent", 0, 1), ("n_recent", 1.5, 1), ("n_sink", -1, 0), ("n_sink", None, 0)],
)
def test_expected_attention_sizes(field, value, minimum):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= {minimum}"):
        ExpectedAttentionPress(**{field: value})


@pytest.mark.parametrize("field", ["use_covariance", "use_value_norm"])
def test_expected_attention_flags(field):
    with pytest.raises(TypeError, match=f"{field} must be True or False"):
        ExpectedAttentionPress(**{field: 1})


@pytest.mark.parametrize(
    "window_size, kernel_size, message",
    [(0, 5, "window_size must be an integer >= 1, got 0"), (8, 4, "kernel_size must be an odd integer >= 1, got 4"),
     (8, 0, "kernel_size must be an odd integer >= 1, got 0")],
)
def test_snapkv_family_window_and_kernel(window_size, kernel_size, message):
    for press_class in (SnapKVPress, PyramidKVPress):
        with pytest.raises(ValueError, match=message):
            press_class(window_size=window_size, kernel_size=kernel_size)


@pytest.mark.parametrize(
    "press",
    [AdaptivePress(SnapKVPress()), ChunkPress(KnormPress()), KeyRerotationPress(KnormPress())],
    ids=["adaptive", "chunk", "key_rerotation"],
)
def test_wrapper_ratio_setter_checks_the_range(press):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press.compression_ratio = 1.0


def test_observed_attention_without_eager_attention():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        with torch.no_grad(), ObservedAttentionPress(compression_ratio=0.5)(model):
            model(random_ids(seq_len=16))


@pytest.mark.parametrize("backend", ["evict_typo", "", 1])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        KnormPress(backend=backend)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda value: P.AdaptivePress(P.SnapKVPress(0.5), alpha_safeguard=value), "alpha_safeguard"),
        (lambda value: P.CriticalKVPress(P.SnapKVPress(0.5), first_stage_ratio=value), "first_stage_ratio"),
        (lambda value: P.HeadKVPress(P.SnapKVPress(0.5), base_fraction=value), "base_fraction"),
        (lambda value: P.SimLayerKVPress(lazy_threshold=value), "lazy_threshold"),
    ],
    ids=["alpha_safeguard", "first_stage_ratio", "base_fraction", "lazy_threshold"],
)
@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5", None])
def test_every_fraction_field_refuses_what_is_not_a_number_in_0_1(make, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\], got {re.escape(repr(value))}"):
        make(value)
