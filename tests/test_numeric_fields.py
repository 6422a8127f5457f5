"""Numeric press fields accept every real number type (numpy scalars included) and store a Python float or
int; bools and non-numbers are refused with the field's name (issue 22: "a ratio given as a numpy scalar
type that is a valid number is refused with 'must be a number'"), at construction and on assignment after it
(presses/fields.py, applied by BasePress.__setattr__)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adakv as P
from adakv.cache import compressed_layers

from conftest import random_ids, tiny_model

REAL_TYPES = [np.float16, np.float32, np.float64]
INTEGER_TYPES = [np.int8, np.int32, np.int64, np.uint16]
NOT_NUMBERS = [True, False, np.bool_(True), "0.5", None, float("nan")]


def assert_python(value, kind) -> None:
    assert type(value) is kind, f"{value!r} is a {type(value).__name__}, not a Python {kind.__name__}"


# --- SnapKV, PyramidKV and Random fields -------------------------------------------------------------------


@pytest.mark.parametrize("kind", INTEGER_TYPES)
def test_snapkv_sizes_take_numpy_integers(kind):
    for press_class in (P.SnapKVPress, P.PyramidKVPress):
        press = press_class(window_size=kind(8), kernel_size=kind(3))
        assert_python(press.window_size, int) and assert_python(press.kernel_size, int)
        assert (press.window_size, press.kernel_size) == (8, 3)


@pytest.mark.parametrize(
    "window_size, kernel_size, name",
    [(8.0, 5, "window_size"), (8, 5.0, "kernel_size"), (True, 5, "window_size"), (8, np.float64(5), "kernel_size"),
     ("8", 5, "window_size")],
)
def test_snapkv_sizes_refuse_what_is_not_an_integer(window_size, kernel_size, name):
    with pytest.raises(TypeError, match=f"{name} must be an (odd )?integer >= 1, got .*; ints and numpy integers"):
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


# --- ratios, fractions and sizes of every press -----------------------------------------------------------

SCORERS = [P.SnapKVPress, P.PyramidKVPress, P.KnormPress, P.StreamingLLMPress, P.TOVAPress, P.KeyDiffPress,
           P.ExpectedAttentionPress, P.LagKVPress, P.CURPress, P.FinchPress, P.RandomPress]


@pytest.mark.parametrize("kind", REAL_TYPES)
@pytest.mark.parametrize("press_class", SCORERS, ids=lambda cls: cls.__name__)
def test_compression_ratio_takes_numpy_numbers(press_class, kind):
    press = press_class(compression_ratio=kind(0.25))
    assert_python(press.compression_ratio, float) and press.compression_ratio == 0.25
    assert_python(press_class(compression_ratio=np.int64(0)).compression_ratio, float)


@pytest.mark.parametrize("ratio", NOT_NUMBERS + [np.float32(1.0), np.float64(-0.1), float("inf")])
def test_compression_ratio_refuses_bools_and_non_numbers(ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        P.SnapKVPress(compression_ratio=ratio)


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


@pytest.mark.parametrize("kind", REAL_TYPES + [np.int64])
@pytest.mark.parametrize("make, name", FRACTIONS, ids=[name for _, name in FRACTIONS])
def test_fraction_fields_take_numpy_numbers(make, name, kind):
    press = make(kind(1) if kind is np.int64 else kind(0.5))
    assert_python(getattr(press, name), float)


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


@pytest.mark.parametrize("kind", INTEGER_TYPES)
@pytest.mark.parametrize("make, name", INTEGERS, ids=[f"{i}-{name}" for i, (_, name) in enumerate(INTEGERS)])
def test_integer_fields_take_numpy_integers(make, name, kind):
    press = make(kind(8))
    assert_python(getattr(press, name), int) and getattr(press, name) == 8


@pytest.mark.parametrize("value", [True, np.bool_(True), 8.0, np.float32(8), "8", None])
@pytest.mark.parametrize("make, name", INTEGERS, ids=[f"{i}-{name}" for i, (_, name) in enumerate(INTEGERS)])
def test_integer_fields_refuse_bools_floats_and_non_numbers(make, name, value):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
        make(value)


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


# --- every rule of every press, on assignment as at construction --------------------------------------------

from adakv.presses.fields import Check, Flag, Integer, OneOf, Real, RealList, Text, Tokenizer, TokenIds  # noqa: E402

REQUIRED = {
    "press": lambda: P.SnapKVPress(0.5, window_size=4),
    "presses": lambda: [P.KnormPress(0.5)],
    "compression_ratios": lambda: [0.5, 0.5, 0.5],
    "prefill_press": lambda: P.KnormPress(0.5),
    "decoding_press": lambda: P.DecodingPress(P.KnormPress(), compression_interval=4, target_size=8),
}
PRESS_CLASSES = [
    getattr(P, name) for name in P.presses.__all__
    if isinstance(getattr(P, name), type) and issubclass(getattr(P, name), P.BasePress)
]


def make(press_class, **overrides):
    """A valid press of `press_class` (its required fields from REQUIRED), with `overrides`."""
    import dataclasses

    required = {f.name: REQUIRED[f.name]() for f in dataclasses.fields(press_class)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init}
    if press_class is P.DecodingPress:
        required["press"] = P.KnormPress()
    return press_class(**{**required, **overrides})


def bad_values(rule) -> list:
    """Values `rule` refuses: wrong types and out-of-range values."""
    if isinstance(rule, Real):
        out_of_range = [rule.minimum - 1] + ([] if rule.maximum is None else [rule.maximum + 1])
        return ["0.5", True, None, float("nan"), *out_of_range]
    if isinstance(rule, Integer):
        return [2.5, True, "8", rule.minimum - 1] + ([] if rule.optional else [None]) + ([4] if rule.odd else [])
    if isinstance(rule, Flag):
        return [1, "yes", None]
    if isinstance(rule, OneOf):
        return ["no-such-choice", 3]
    if isinstance(rule, RealList):
        return [[], [0.5, "x"], 0.5, [2.0]]
    if isinstance(rule, Text):
        return [3]
    if isinstance(rule, Tokenizer):
        return ["tokenizer", 5]
    if isinstance(rule, TokenIds):
        return ["ab", [-1], [1.5]]
    if isinstance(rule, Check):
        return [None, "press"]
    raise AssertionError(f"no bad values for {rule!r}")


RULE_CASES = [
    (press_class, name, value)
    for press_class in PRESS_CLASSES
    for name, rule in press_class.field_rules.items()
    for value in bad_values(rule)
]


@pytest.mark.parametrize(
    "press_class, name, value", RULE_CASES,
    ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in RULE_CASES],
)
def test_assignment_raises_what_construction_raises_and_keeps_the_value(press_class, name, value):
    with pytest.raises((TypeError, ValueError)) as at_construction:
        make(press_class, **{name: value})
    press = make(press_class)
    before = getattr(press, name)
    with pytest.raises(type(at_construction.value)) as on_assignment:
        setattr(press, name, value)
    assert str(on_assignment.value) == str(at_construction.value)
    assert name in str(on_assignment.value)
    assert getattr(press, name) is before


def test_every_press_with_fields_has_rules_for_them():
    import dataclasses

    unruled: set[str] = set()
    for press_class in PRESS_CLASSES:
        names = {f.name for f in dataclasses.fields(press_class)} - unruled
        assert names <= set(press_class.field_rules), f"{press_class.__name__}: {names - set(press_class.field_rules)}"


@pytest.mark.parametrize("value", [2.0, 1.0, -0.5, "0.5", True])
def test_a_ratio_set_after_construction_is_refused(value):
    press = P.SnapKVPress(0.5)
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press.compression_ratio = value
    assert press.compression_ratio == 0.5
    wrapper = P.AdaptivePress(P.CriticalKVPress(press))
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        wrapper.compression_ratio = value
    assert press.compression_ratio == 0.5


@pytest.mark.parametrize("window_size", [2.5, True, "8"])
def test_a_window_that_is_not_an_integer_is_refused_up_front(window_size):
    with pytest.raises(TypeError, match=r"window_size must be an integer >= 1, got .*\(\w+\); ints and numpy integers"):
        P.SnapKVPress(0.5, window_size=window_size)
    press = P.SnapKVPress(0.5)
    with pytest.raises(TypeError, match="window_size must be an integer >= 1"):
        press.window_size = window_size


def test_assigned_numpy_numbers_are_stored_as_python_numbers():
    press = P.SnapKVPress(0.5)
    press.compression_ratio, press.window_size = np.float32(0.25), np.int64(16)
    assert_python(press.compression_ratio, float) and assert_python(press.window_size, int)
    assert (press.compression_ratio, press.window_size) == (0.25, 16)


def test_a_ratio_that_follows_from_other_fields_cannot_be_set():
    with pytest.raises(AttributeError, match="ComposedPress's compression_ratio follows from its presses' ratios"):
        P.ChunkPress(P.ComposedPress([P.KnormPress(0.5)])).compression_ratio = 0.5
    with pytest.raises(AttributeError, match="set prefill_press.compression_ratio"):
        P.PrefillDecodingPress(P.KnormPress(0.5), P.DecodingPress(P.KnormPress())).compression_ratio = 0.5
    with pytest.raises(AttributeError, match="wraps a RecordingPress, which has no compression_ratio"):
        P.KeyRerotationPress(P.RecordingPress()).compression_ratio = 0.5
    with pytest.raises(AttributeError, match="set compression_ratios"):
        P.AdaptivePress(P.PerLayerCompressionPress(P.KnormPress(), [0.5] * 3)).compression_ratio = 0.5


def test_a_block_checks_fields_changed_in_place_and_inner_presses_changed_since():
    model = tiny_model("llama")
    per_layer = P.PerLayerCompressionPress(P.KnormPress(), [0.5, 0.5, 0.5])
    per_layer.compression_ratios[1] = 2.0
    with pytest.raises(ValueError, match=r"compression_ratios\[1\] must be a number in \[0, 1\), got 2.0"):
        with per_layer(model):
            pass
    decoding = P.DecodingPress(P.SnapKVPress(window_size=8), hidden_states_buffer_size=16)
    decoding.press.window_size = 32
    with pytest.raises(ValueError, match=r"hidden_states_buffer_size \(16\) must be at least the press's query window \(32"):
        with decoding(model):
            pass
    assert model.config._attn_implementation == "sdpa"
