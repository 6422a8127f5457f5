"""A left-padded row is compressed exactly as the same prompt alone (fp32): every press of the matrix keeps the
same positions of it (none of its padding) and generates the same tokens. Presses that refuse padded batches
(KVzipPress) say so clearly."""

from __future__ import annotations

import pytest
import torch

from adakv import (
    AdaptivePress,
    CriticalKVPress,
    DecodingPress,
    KVzipPress,
    PrefillDecodingPress,
    SimLayerKVPress,
    SnapKVPress,
)
from adakv.cache import compressed_layers

from conftest import random_ids
from test_presses import RATIO, SCORERS, WRAPPERS, attention_for, cached_model, greedy

LONG, SHORT = 48, 35  # the short prompt is left-padded by 13 in the batch
NEW_TOKENS = 4
# scorers whose scores would not fit a scope="model" AdaptivePress are still covered by the layer scope


def padded_batch(short: int = SHORT, long: int = LONG, seed: int = 5):
    """(ids, attention_mask) of a batch: row 0 the short prompt left-padded, row 1 the long one; and the rows."""
    first = random_ids(seq_len=short, seed=seed)
    second = random_ids(seq_len=long, seed=seed + 1)
    ids = torch.zeros(2, long, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    ids[0, long - short :], attention_mask[0, long - short :] = first[0], 1
    ids[1], attention_mask[1] = second[0], 1
    return ids, attention_mask, [first, second]


def context_keeps(cache) -> dict[int, torch.Tensor]:
    """Per compressed layer the context keep mask (batch, kv_heads, seq) of a backend="mask" run."""
    return {index: layer.context_keep for index, layer in compressed_layers(cache).items()}


def run(press, model, ids, attention_mask=None, new_tokens=NEW_TOKENS):
    with press(model):
        out = greedy(model, ids, attention_mask, max_new_tokens=new_tokens)
    return out.sequences[:, ids.shape[1] :], context_keeps(out.past_key_values)


def assert_rows_as_alone(make_press, model, short=SHORT, long=LONG, new_tokens=NEW_TOKENS):
    ids, attention_mask, rows = padded_batch(short, long)
    tokens, keeps = run(make_press(), model, ids, attention_mask, new_tokens)
    for row, alone_ids in enumerate(rows):
        alone_tokens, alone_keeps = run(make_press(), model, alone_ids, None, new_tokens)
        pad = long - alone_ids.shape[1]
        for index in keeps.keys() | alone_keeps.keys():  # a layer left dense keeps every real token
            keep = keeps[index][row] if index in keeps else attention_mask[row].bool().expand_as(alone_keeps[index][0])
            alone_keep = alone_keeps[index][0] if index in alone_keeps else torch.ones_like(keep[:, pad:])
            assert not keep[:, :pad].any(), f"row {row}, layer {index}: padding kept"
            assert torch.equal(keep[:, pad:], alone_keep), f"row {row}, layer {index}: keep differs"
        assert torch.equal(tokens[row], alone_tokens[0]), f"row {row}: generated tokens differ"


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_padded_row_is_compressed_as_the_row_alone(scorer, wrapper):
    model = cached_model("llama", attention_for(scorer))

    def make_press():
        press = WRAPPERS[wrapper](SCORERS[scorer](RATIO), RATIO)
        press.backend = "mask"  # the test reads the kept positions (MaskedLayer.context_keep)
        return press

    assert_rows_as_alone(make_press, model)


# --- DecodingPress: evict and mask score the same tokens with SnapKV's default pooling ---------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_decoding_evict_matches_mask_with_default_pooling(family, adaptive):
    """The evict backend scores a right-aligned, compacted view of each head's kept rows (zero-filled in
    front), the mask backend the dense view with pruned positions unavailable. Pooling over each head's
    available positions (pool_available) gives both the same neighbours, so with SnapKV's default
    kernel_size=5 (not only kernel_size=1) the logits and kept counts agree."""
    from test_decoding_press import greedy_steps

    from adakv import kept_token_counts

    model = cached_model(family)
    ids = random_ids(2, 40, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :9], attention_mask[1, :9] = 0, 0
    runs = {}
    for backend in ("mask", "evict"):
        inner = SnapKVPress(window_size=4)
        assert inner.kernel_size == 5
        inner = AdaptivePress(inner) if adaptive else inner
        press = DecodingPress(inner, compression_interval=8, target_size=12, hidden_states_buffer_size=8, backend=backend)
        runs[backend] = greedy_steps(model, press, ids, 30, attention_mask)
    (mask_logits, mask_cache), (evict_logits, evict_cache) = runs["mask"], runs["evict"]
    for step, (expected, actual) in enumerate(zip(mask_logits, evict_logits)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward {step}: {m}")
    mask_counts, evict_counts = kept_token_counts(mask_cache), kept_token_counts(evict_cache)
    assert mask_counts.keys() == evict_counts.keys() and mask_counts
    for index in mask_counts:
        assert torch.equal(mask_counts[index], evict_counts[index])


# --- the evict backend, every family, decoding presses, refusals ------------------------------------------


def kept_counts_of(cache) -> dict[int, torch.Tensor]:
    from adakv import kept_token_counts

    return kept_token_counts(cache)


@pytest.mark.parametrize("wrapper", ["none", "adaptive", "chunkkv"])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_padded_row_under_evict_generates_as_the_row_alone(scorer, wrapper):
    """backend="evict" (the default): the same tokens and the same kept count per head as the row alone."""
    model = cached_model("llama", attention_for(scorer))
    ids, attention_mask, rows = padded_batch()
    with (press := WRAPPERS[wrapper](SCORERS[scorer](RATIO), RATIO))(model):
        out = greedy(model, ids, attention_mask, max_new_tokens=NEW_TOKENS)
    batch_counts = kept_counts_of(out.past_key_values)
    for row, alone_ids in enumerate(rows):
        with (press := WRAPPERS[wrapper](SCORERS[scorer](RATIO), RATIO))(model):
            alone = greedy(model, alone_ids, max_new_tokens=NEW_TOKENS)
        assert torch.equal(out.sequences[row, LONG:], alone.sequences[0, alone_ids.shape[1] :]), f"row {row}"
        for index, counts in kept_counts_of(alone.past_key_values).items():
            assert torch.equal(batch_counts[index][row], counts[0]), f"row {row}, layer {index}"


@pytest.mark.parametrize("wrapper", ["none", "adaptive", "critical", "chunk"])
def test_padded_row_is_compressed_as_the_row_alone_in_every_family(family, wrapper):
    model = cached_model(family)

    def make_press():
        press = WRAPPERS[wrapper](SnapKVPress(compression_ratio=RATIO), RATIO)  # SnapKV's default kernel_size 5
        press.backend = "mask"
        return press

    assert_rows_as_alone(make_press, model)


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("prefill", [False, True])
def test_decoding_presses_compress_a_padded_row_as_the_row_alone(backend, prefill):
    model = cached_model("llama")

    def make_press():
        decoding = DecodingPress(AdaptivePress(SnapKVPress(window_size=4)), compression_interval=4, target_size=16,
                                 hidden_states_buffer_size=8, backend=backend)  # fmt: skip
        if not prefill:
            return decoding
        return PrefillDecodingPress(CriticalKVPress(SnapKVPress(RATIO, window_size=8)), decoding, backend=backend)

    ids, attention_mask, rows = padded_batch()
    with make_press()(model):
        out = greedy(model, ids, attention_mask, max_new_tokens=14)  # three compressions during decoding
    batch_counts = kept_counts_of(out.past_key_values)
    for row, alone_ids in enumerate(rows):
        with make_press()(model):
            alone = greedy(model, alone_ids, max_new_tokens=14)
        assert torch.equal(out.sequences[row, LONG:], alone.sequences[0, alone_ids.shape[1] :]), f"row {row}"
        for index, counts in kept_counts_of(alone.past_key_values).items():
            assert torch.equal(batch_counts[index][row], counts[0]), f"row {row}, layer {index}"


def test_simlayerkv_decides_per_row_and_a_wrapper_refuses_rows_that_disagree():
    """With lazy_threshold 0.35 the layers are lazy for the short prompt (share about 0.40 of the last 32
    queries' attention) and not for the long one (about 0.29): each row is compressed as alone; a wrapper,
    which takes one ratio per layer for the whole batch, refuses instead of compressing a row differently."""
    model = cached_model("llama")
    assert_rows_as_alone(lambda: SimLayerKVPress(RATIO, lazy_threshold=0.35, backend="mask"), model)
    ids, attention_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="lazy for 1 of the 2 batch rows"):
        run(AdaptivePress(SimLayerKVPress(RATIO, lazy_threshold=0.35)), model, ids, attention_mask)
    for threshold in (0.2, 0.6):  # rows agree: the wrapper works and each row is as alone
        assert_rows_as_alone(lambda: AdaptivePress(SimLayerKVPress(RATIO, lazy_threshold=threshold), backend="mask"),
                             model)  # fmt: skip


@pytest.mark.parametrize("adaptive", [False, True])
def test_kvzip_refuses_a_padded_batch_clearly(adaptive):
    model = cached_model("llama")
    press = KVzipPress(RATIO, repeat_prompt_ids=(5, 6, 7))
    press = AdaptivePress(press) if adaptive else press
    ids, attention_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="KVzipPress cannot score a padded batch"):
        run(press, model, ids, attention_mask)
