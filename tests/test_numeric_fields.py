"""Numeric press fields accept every real number type (numpy scalars included) and store a Python float or
int; bools and non-numbers are refused with the field's name (issue 22: "a ratio given as a numpy scalar
type that is a valid number is refused with 'must be a number'").

The tests marked `needs_base_change` exercise presses/base.py's check_compression_ratio /
check_fraction_fields / check_integer_fields; they are skipped until those accept numbers.Real /
numbers.Integral (delete the skip in `needs_base_change` then). The others pass today."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adakv as P
from adakv.cache import compressed_layers

from conftest import random_ids, tiny_model

needs_base_change = pytest.mark.skip(
    reason="enable when presses/base.py's numeric checks accept numbers.Real / numbers.Integral (issue 22)"
)

REAL_TYPES = [np.float16, np.float32, np.float64]
INTEGER_TYPES = [np.int8, np.int32, np.int64, np.uint16]
NOT_NUMBERS = [True, False, np.bool_(True), "0.5", None, float("nan")]


def assert_python(value, kind) -> None:
    assert type(value) is kind, f"{value!r} is a {type(value).__name__}, not a Python {kind.__name__}"


# --- fields the presses check themselves (pass today) --------------------------------------------------


@pytest.mark.parametrize("kind", INTEGER_TYPES)
def test_snapkv_sizes_take_numpy_integers(kind):
    for press_class in (P.SnapKVPress, P.PyramidKVPress):
        press = press_class(window_size=kind(8), kernel_size=kind(3))
        assert_python(press.window_size, int) and assert_python(press.kernel_size, int)
        assert (press.window_size, press.kernel_size) == (8, 3)


@pytest.mark.parametrize("window_size, kernel_size", [(8.0, 5), (8, 5.0), (True, 5), (8, np.float64(5)), ("8", 5)])
def test_snapkv_sizes_refuse_what_is_not_an_integer(window_size, kernel_size):
    with pytest.raises(ValueError, match="window_size must be >= 1 and kernel_size a positive odd number, both integers"):
        P.SnapKVPress(window_size=window_size, kernel_size=kernel_size)


@pytest.mark.parametrize("kind", REAL_TYPES + INTEGER_TYPES)
def test_pyramid_beta_takes_numpy_numbers(kind):
    press = P.PyramidKVPress(beta=kind(4))
    assert_python(press.beta, float) and press.beta == 4.0


@pytest.mark.parametrize("beta", [True, np.bool_(True), "4", None, float("nan"), 0.5])
def test_pyramid_beta_refuses_what_is_not_a_number_at_least_1(beta):
    with pytest.raises(ValueError, match="beta must be a number >= 1"):
        P.PyramidKVPress(beta=beta)


@pytest.mark.parametrize("kind", INTEGER_TYPES)
def test_random_seed_takes_numpy_integers(kind):
    press = P.RandomPress(0.5, seed=kind(3))
    assert_python(press.seed, int) and press.seed == 3


@pytest.mark.parametrize("seed", [True, np.bool_(False), 3.0, np.float32(3), "3", -1])
def test_random_seed_refuses_what_is_not_an_integer(seed):
    with pytest.raises(ValueError, match="seed must be None or an integer >= 0"):
        P.RandomPress(0.5, seed=seed)


# --- fields checked in presses/base.py (enable with the change there) -------------------------------------

SCORERS = [P.SnapKVPress, P.PyramidKVPress, P.KnormPress, P.StreamingLLMPress, P.TOVAPress, P.KeyDiffPress,
           P.ExpectedAttentionPress, P.LagKVPress, P.CURPress, P.FinchPress, P.RandomPress]


@needs_base_change
@pytest.mark.parametrize("kind", REAL_TYPES)
@pytest.mark.parametrize("press_class", SCORERS, ids=lambda cls: cls.__name__)
def test_compression_ratio_takes_numpy_numbers(press_class, kind):
    press = press_class(compression_ratio=kind(0.25))
    assert_python(press.compression_ratio, float) and press.compression_ratio == 0.25
    assert_python(press_class(compression_ratio=np.int64(0)).compression_ratio, float)


@needs_base_change
@pytest.mark.parametrize("ratio", NOT_NUMBERS + [np.float32(1.0), np.float64(-0.1), float("inf")])
def test_compression_ratio_refuses_bools_and_non_numbers(ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        P.SnapKVPress(compression_ratio=ratio)


@needs_base_change
def test_wrapper_ratio_setter_and_per_layer_ratios_store_python_floats():
    press = P.AdaptivePress(P.CriticalKVPress(P.SnapKVPress()))
    press.compression_ratio = np.float32(0.5)
    assert_python(press.press.press.compression_ratio, float) and press.compression_ratio == 0.5
    with pytest.raises(ValueError, match="compression_ratio must be a number"):
        press.compression_ratio = np.bool_(False)
    per_layer = P.PerLayerCompressionPress(P.KnormPress(), [np.float32(0.25), np.float64(0.5), np.int64(0)])
    assert [type(r) for r in per_layer.compression_ratios] == [float] * 3
    think = P.ThinKPress(P.KnormPress(), key_channel_compression_ratio=np.float32(0.5))
    assert_python(think.key_channel_compression_ratio, float)


FRACTIONS = [
    (lambda value: P.AdaptivePress(P.SnapKVPress(0.5), alpha_safeguard=value), "alpha_safeguard"),
    (lambda value: P.CriticalKVPress(P.SnapKVPress(0.5), first_stage_ratio=value), "first_stage_ratio"),
    (lambda value: P.HeadKVPress(P.SnapKVPress(0.5), base_fraction=value), "base_fraction"),
    (lambda value: P.SimLayerKVPress(lazy_threshold=value), "lazy_threshold"),
]


@needs_base_change
@pytest.mark.parametrize("kind", REAL_TYPES + [np.int64])
@pytest.mark.parametrize("make, name", FRACTIONS, ids=[name for _, name in FRACTIONS])
def test_fraction_fields_take_numpy_numbers(make, name, kind):
    press = make(kind(1) if kind is np.int64 else kind(0.5))
    assert_python(getattr(press, name), float)


@needs_base_change
@pytest.mark.parametrize("value", NOT_NUMBERS)
@pytest.mark.parametrize("make, name", FRACTIONS, ids=[name for _, name in FRACTIONS])
def test_fraction_fields_refuse_bools_and_non_numbers(make, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\]"):
        make(value)


INTEGERS = [
    (lambda value: P.StreamingLLMPress(0.5, n_sink=value), "n_sink"),
    (lambda value: P.ChunkPress(P.KnormPress(0.5), chunk_length=value), "chunk_length"),
    (lambda value: P.LagKVPress(0.5, lag_size=value), "lag_size"),
    (lambda value: P.ExpectedAttentionPress(0.5, n_recent=value), "n_recent"),
    (lambda value: P.FinchPress(0.5, chunk_length=value), "chunk_length"),
    (lambda value: P.BlockPress(P.KnormPress(0.5), block_size=value), "block_size"),
    (lambda value: P.DecodingPress(P.KnormPress(), target_size=value), "target_size"),
]


@needs_base_change
@pytest.mark.parametrize("kind", INTEGER_TYPES)
@pytest.mark.parametrize("make, name", INTEGERS, ids=[f"{i}-{name}" for i, (_, name) in enumerate(INTEGERS)])
def test_integer_fields_take_numpy_integers(make, name, kind):
    press = make(kind(8))
    assert_python(getattr(press, name), int) and getattr(press, name) == 8


@needs_base_change
@pytest.mark.parametrize("value", [True, np.bool_(True), 8.0, np.float32(8), "8", None])
@pytest.mark.parametrize("make, name", INTEGERS, ids=[f"{i}-{name}" for i, (_, name) in enumerate(INTEGERS)])
def test_integer_fields_refuse_bools_floats_and_non_numbers(make, name, value):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
        make(value)


@needs_base_change
def test_a_numpy_ratio_compresses_as_the_same_float():
    model = tiny_model("llama")
    ids = random_ids(seq_len=40)
    keeps = []
    for ratio in (0.5, np.float32(0.5)):
        press = P.AdaptivePress(P.SnapKVPress(compression_ratio=ratio, window_size=8), backend="mask")
        with torch.no_grad(), press(model):
            out = model(ids, use_cache=True)
        keeps.append([layer.context_keep for layer in compressed_layers(out.past_key_values).values()])
    assert all(torch.equal(a, b) for a, b in zip(*keeps))
