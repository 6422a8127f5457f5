"""Invariants searched with hypothesis (issue 22), not sampled at a few fixed points: it draws a press (scorer x
wrapper), a backend, a ratio, a batch shape with left padding and a tiny-model family, and checks

- evict gives mask's tokens and kept counts;
- a left-padded row is compressed and answered exactly as the row alone (fp32);
- ratio 0 is no press (the unpressed tokens, no compressed layer);
- kept counts respect the budget (per head, or per layer for Ada-KV) and Ada-KV's floor;
- after the block (normal exit, an exception at a random layer, KeyboardInterrupt during decoding) the model has no
  hooks, its attention implementation and generate are restored and it generates what a never-pressed model does.

derandomize=True: the same examples on every run (CI is deterministic); the counts keep the file under a minute on
two CPU cores. A combination that a press refuses (a clear ValueError / NotImplementedError) must be refused by
both backends alike.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adakv import AdaptivePress
from adakv.cache import compressed_layers
from adakv.selection import kept_count

from conftest import FAMILY_CONFIGS, random_ids, tiny_model
from test_padding_invariance import context_keeps
from test_presses import SCORERS, WRAPPERS, attention_for, cached_model, context_counts, greedy

SEARCH = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
NEW_TOKENS = 3
FAMILIES = sorted(FAMILY_CONFIGS)
RATIOS = [0.0, 0.25, 0.5, 0.75, 0.9]
REFUSALS = (ValueError, NotImplementedError)


@st.composite
def batches(draw, max_rows: int = 3):
    """(ids, attention_mask, rows): a batch of 1 to `max_rows` prompts of 12 to 28 tokens, left-padded to the
    longest, and each prompt alone (1, length)."""
    lengths = draw(st.lists(st.integers(12, 28), min_size=1, max_size=max_rows))
    seed = draw(st.integers(0, 1000))
    rows = [random_ids(seq_len=length, seed=seed + i) for i, length in enumerate(lengths)]
    longest = max(lengths)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - row.shape[1] :], mask[i, longest - row.shape[1] :] = row[0], 1
    return ids, mask, rows


def make_press(scorer: str, wrapper: str, ratio: float, backend: str | None):
    press = WRAPPERS[wrapper](SCORERS[scorer](ratio), ratio)
    press.backend = backend
    return press


def run(press, model, ids, mask):
    """(new tokens, cache) of a greedy generate inside the press's block."""
    with press(model):
        out = greedy(model, ids, mask, max_new_tokens=NEW_TOKENS)
    return out.sequences[:, ids.shape[1] :], out.past_key_values


def outcome(press, model, ids, mask):
    """run's result, or the refusal's type when the press refuses this batch."""
    try:
        return run(press, model, ids, mask)
    except REFUSALS as refusal:
        return type(refusal)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads make each generate ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


presses = st.tuples(st.sampled_from(sorted(SCORERS)), st.sampled_from(sorted(WRAPPERS)))


@SEARCH
@given(press=presses, family=st.sampled_from(FAMILIES), ratio=st.sampled_from(RATIOS[1:]), batch=batches())
def test_evict_gives_the_tokens_and_counts_of_mask(press, family, ratio, batch):
    (scorer, wrapper), (ids, mask, _) = press, batch
    model = cached_model(family, attention_for(scorer))
    masked = outcome(make_press(scorer, wrapper, ratio, "mask"), model, ids, mask)
    evicted = outcome(make_press(scorer, wrapper, ratio, "evict"), model, ids, mask)
    if isinstance(masked, type) or isinstance(evicted, type):
        assert masked == evicted, f"one backend refused, the other did not: {masked} / {evicted}"
        event("refused by both backends")
        return
    assert torch.equal(evicted[0], masked[0])
    mask_counts, evict_counts = context_counts(masked[1]), context_counts(evicted[1])
    assert mask_counts.keys() == evict_counts.keys()
    for index in mask_counts:
        assert torch.equal(mask_counts[index], evict_counts[index]), f"layer {index}"


@SEARCH
@given(press=presses, family=st.sampled_from(FAMILIES), ratio=st.sampled_from(RATIOS[1:]), batch=batches())
def test_a_padded_row_is_compressed_and_answered_as_the_row_alone(press, family, ratio, batch):
    (scorer, wrapper), (ids, mask, rows) = press, batch
    model = cached_model(family, attention_for(scorer))
    together = outcome(make_press(scorer, wrapper, ratio, "mask"), model, ids, mask)
    if isinstance(together, type):
        event("refused")
        return  # refused (e.g. SimLayerKV rows that disagree inside a wrapper): a clear error, not a wrong answer
    tokens, keeps = together[0], context_keeps(together[1])
    for row, alone in enumerate(rows):
        alone_tokens, alone_cache = run(make_press(scorer, wrapper, ratio, "mask"), model, alone, None)
        alone_keeps, pad = context_keeps(alone_cache), ids.shape[1] - alone.shape[1]
        for index in keeps.keys() | alone_keeps.keys():  # a layer left dense keeps every real token
            keep = keeps[index][row] if index in keeps else mask[row].bool().expand_as(alone_keeps[index][0])
            alone_keep = alone_keeps[index][0] if index in alone_keeps else torch.ones_like(keep[:, pad:])
            assert not keep[:, :pad].any(), f"row {row}, layer {index}: padding kept"
            assert torch.equal(keep[:, pad:], alone_keep), f"row {row}, layer {index}: keep differs"
        assert torch.equal(tokens[row], alone_tokens[0]), f"row {row}: tokens differ"


@SEARCH
@given(press=presses, family=st.sampled_from(FAMILIES), backend=st.sampled_from(["mask", "evict"]), batch=batches())
def test_ratio_zero_is_no_press(press, family, backend, batch):
    (scorer, wrapper), (ids, mask, _) = press, batch
    model = cached_model(family, attention_for(scorer))
    reference = greedy(model, ids, mask, max_new_tokens=NEW_TOKENS).sequences[:, ids.shape[1] :]
    tokens, cache = run(make_press(scorer, wrapper, 0.0, backend), model, ids, mask)
    assert torch.equal(tokens, reference)
    assert compressed_layers(cache) == {}


# scorers that apply the press's ratio to every layer, and wrappers that keep a uniform or Ada-KV budget
BUDGET_SCORERS = ["snapkv", "knorm", "streaming_llm", "random", "tova", "expected_attention", "keydiff", "cur"]
BUDGET_WRAPPERS = ["none", "adaptive", "block", "critical", "chunkkv"]


@SEARCH
@given(
    scorer=st.sampled_from(BUDGET_SCORERS), wrapper=st.sampled_from(BUDGET_WRAPPERS), family=st.sampled_from(FAMILIES),
    ratio=st.sampled_from(RATIOS[1:]), backend=st.sampled_from(["mask", "evict"]), batch=batches(),
)  # fmt: skip
def test_kept_counts_respect_the_budget_and_the_floor(scorer, wrapper, family, ratio, backend, batch):
    ids, mask, _ = batch
    model = cached_model(family, attention_for(scorer))
    press = make_press(scorer, wrapper, ratio, backend)
    with press(model), torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    counts = context_counts(cache)
    assert counts, "nothing was compressed"
    per_head = kept_count(mask.sum(-1), ratio)  # (batch,) what one head keeps of its row's real tokens
    for index, kept in counts.items():  # (batch, kv_heads)
        kv_heads = kept.shape[1]
        if isinstance(press, AdaptivePress):
            assert torch.equal(kept.sum(-1), per_head * kv_heads), f"layer {index}: the layer's budget"
            floor = torch.floor(press.alpha_safeguard * per_head.double()).long()
            assert (kept >= floor[:, None]).all(), f"layer {index}: a head below the floor"
            assert (kept <= mask.sum(-1, keepdim=True)).all(), f"layer {index}: a head above its tokens"
        elif wrapper == "chunkkv":  # whole chunks: at least the budget, less than one chunk more
            assert (kept >= per_head[:, None]).all() and (kept < per_head[:, None] + 5).all(), f"layer {index}"
        else:
            assert torch.equal(kept, per_head[:, None].expand_as(kept)), f"layer {index}: a head's budget"


# --- the model after the block -------------------------------------------------------------------------------------


class Injected(RuntimeError):
    pass


def interrupting_hook(layer: int, when: str, decode_step: int):
    """A forward hook for decoder layer `layer`: raises Injected in the context prefill ("prefill") or
    KeyboardInterrupt at decode step `decode_step` ("decode"; generate's first token comes from the prefill, so
    NEW_TOKENS tokens take NEW_TOKENS - 1 decode steps)."""
    steps = [0]

    def hook(module, args, output):
        tokens = args[0].shape[1] if args else output[0].shape[1]
        if when == "prefill" and tokens > 1:
            raise Injected(f"injected at layer {layer}")
        if when == "decode" and tokens == 1:
            steps[0] += 1
            if steps[0] == decode_step:
                raise KeyboardInterrupt

    return hook


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    press=presses, family=st.sampled_from(FAMILIES), backend=st.sampled_from(["mask", "evict"]),
    when=st.sampled_from(["normal", "prefill", "decode"]), layer=st.integers(0, 2), decode_step=st.integers(1, NEW_TOKENS - 1),
    batch=batches(max_rows=2),
)  # fmt: skip
def test_after_the_block_the_model_is_as_never_pressed(press, family, backend, when, layer, decode_step, batch):
    (scorer, wrapper), (ids, mask, _) = press, batch
    implementation = attention_for(scorer)
    model = tiny_model(family, implementation)
    handle = None
    if when != "normal":
        decoder_layer = model.model.layers[layer]
        handle = decoder_layer.register_forward_hook(interrupting_hook(layer, when, decode_step))
    expected = {"normal": (), "prefill": Injected, "decode": KeyboardInterrupt}[when]
    try:
        with pytest.raises(expected) if expected else _no_error():
            try:
                run(make_press(scorer, wrapper, 0.5, backend), model, ids, mask)
            except REFUSALS:
                pass  # a clear refusal of this combination: the block must still leave the model as it was
    finally:
        if handle is not None:
            handle.remove()
    assert model.config._attn_implementation == implementation
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert "generate" not in vars(model)
    assert not any(hasattr(module, "adakv_cache") for module in model.modules())
    never_pressed = cached_model(family, implementation)
    after = greedy(model, ids, mask, max_new_tokens=NEW_TOKENS).sequences
    assert torch.equal(after, greedy(never_pressed, ids, mask, max_new_tokens=NEW_TOKENS).sequences)


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exception):
        return False


def test_the_search_covers_every_family_scorer_and_wrapper():
    """The strategies draw from the whole matrix (a guard against a list shrinking unnoticed)."""
    assert set(FAMILIES) == set(FAMILY_CONFIGS) and len(SCORERS) >= 14 and len(WRAPPERS) >= 12
