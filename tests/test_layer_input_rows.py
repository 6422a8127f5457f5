"""How many of a context's newest layer inputs (hidden states, cos/sin) a press reads (`hidden_states_rows`,
`layer_input_rows` for a tree), and what a press that compresses after the whole prefill holds: only those
rows, copied. A press given fewer rows than it reads fails loudly instead of reading the wrong ones."""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import adakv.presses as presses
from adakv import (
    AdaptivePress,
    ChunkPress,
    ComposedPress,
    DecodingPress,
    ExpectedAttentionPress,
    KnormPress,
    KVzipPress,
    PerLayerCompressionPress,
    PrefillDecodingPress,
    RecordingPress,
    ScorerPress,
    SimLayerKVPress,
    SnapKVPress,
    ThinKPress,
    TOVAPress,
    kept_token_counts,
)
from adakv.cache import compressed_layers
from adakv.runtimes.hf import session as session_module

from conftest import random_ids, tiny_model
from test_presses import RATIO, SCORERS, SEQ, WRAPPERS, attention_for, cached_model

PAD = 5  # left padding of the first row of the recorded batch

# what each press of test_presses' matrix reads itself at its settings there (None: possibly every row)
SCORER_ROWS = {
    "snapkv": 8, "pyramidkv": 8, "tova": 1, "finch": 8, "duo_attention": 8, "expected_attention": 16,
    "simlayerkv": 32, "knorm": 0, "streaming_llm": 0, "random": 0, "observed_attention": 0, "keydiff": 0,
    "lagkv": 0, "cur": 0,
}  # fmt: skip
WRAPPER_ROWS = {
    "none": 0, "adaptive": 0, "composed": 0, "per_layer": 0, "critical": 0, "chunkkv": 0, "headkv": 8,
    "think": 8, "merge": 8, "chunk": None, "block": None, "key_rerotation": None,
}  # fmt: skip
ABSTRACT_PRESSES = {"BasePress", "ScorerPress", "WrapperPress"}


def matrix_press(scorer: str, wrapper: str):
    return WRAPPERS[wrapper](SCORERS[scorer](RATIO), RATIO)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_a_tree_reads_the_most_rows_any_of_its_presses_reads(scorer, wrapper):
    rows = WRAPPER_ROWS[wrapper]
    expected = None if rows is None else max(rows, SCORER_ROWS[scorer])
    press = matrix_press(scorer, wrapper)
    assert press.layer_input_rows == expected


def test_declared_rows_of_the_presses_outside_the_matrix():
    assert KVzipPress(0.5).layer_input_rows == 0
    assert AdaptivePress(KVzipPress(0.5), scope="model").layer_input_rows == 0
    assert DecodingPress(SnapKVPress(window_size=8), hidden_states_buffer_size=96).layer_input_rows == 96
    decoding = DecodingPress(KnormPress(), hidden_states_buffer_size=4)
    both = PrefillDecodingPress(SnapKVPress(0.5, window_size=16), decoding)
    assert both.layer_input_rows == 16
    assert RecordingPress().layer_input_rows is None
    assert ComposedPress([TOVAPress(0.5), ExpectedAttentionPress(0.5, n_recent=24)]).layer_input_rows == 24
    assert ComposedPress([AdaptivePress(SnapKVPress(0.5)), ChunkPress(KnormPress(0.5))]).layer_input_rows is None


def test_declared_rows_follow_the_fields():
    press = AdaptivePress(SnapKVPress(0.5, window_size=8), scope="model")
    press.press.window_size = 40
    assert press.layer_input_rows == 40


def test_a_press_that_does_not_declare_reads_every_row():
    @dataclasses.dataclass
    class Undeclared(ScorerPress):
        def score(self, context):
            return context.hidden_states.float().sum(-1)[:, None].expand_as(context.available)

    assert Undeclared(0.5).hidden_states_rows is None
    assert AdaptivePress(Undeclared(0.5)).layer_input_rows is None


def test_every_exported_press_declares_what_it_reads():
    """Each press class (or a press class it derives from) says it itself: the bases' default, every row, is
    only a safe fallback for presses defined outside adakv."""
    for name in presses.__all__:
        cls = getattr(presses, name)
        if not (isinstance(cls, type) and issubclass(cls, presses.BasePress)) or name in ABSTRACT_PRESSES:
            continue
        own = [k for k in cls.__mro__ if k.__name__ not in ABSTRACT_PRESSES and issubclass(k, presses.BasePress)]
        assert any({"hidden_states_rows", "reads_hidden_states"} & set(vars(k)) for k in own), name


DOCS = Path(__file__).resolve().parents[1] / "docs" / "PRESSES.md"


def documented_rows() -> dict[str, str]:
    """Press name -> its "Rows it reads itself" cell in docs/PRESSES.md's "What a press reads" table."""
    section = DOCS.read_text().split("## What a press reads of the layer inputs\n", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, flags=re.MULTILINE))


def default_press(cls):
    """A press of class `cls` with its defaults (a wrapper around a SnapKVPress; a KnormPress where any press goes)."""
    inner = KnormPress(0.5)
    special = {
        ComposedPress: lambda: ComposedPress([inner]),
        PerLayerCompressionPress: lambda: PerLayerCompressionPress(inner, [0.5]),
        DecodingPress: lambda: DecodingPress(inner),
        PrefillDecodingPress: lambda: PrefillDecodingPress(inner, DecodingPress(inner)),
    }
    if cls in special:
        return special[cls]()
    return cls(SnapKVPress(0.5)) if issubclass(cls, presses.WrapperPress) else cls()


def documented_value(press, cell: str) -> int | None:
    """A table cell as a `hidden_states_rows`: a number, "none" (0), "all" (None) or a field of `press`."""
    if cell.startswith("`"):
        return getattr(press, cell.strip("`"))
    return int(cell) if cell.isdigit() else {"none": 0, "all": None}[cell]


def test_the_documented_rows_are_the_declared_ones():
    documented = documented_rows()
    exported = [name for name in presses.__all__ if name not in ABSTRACT_PRESSES | {"PrefillContext"}]
    assert sorted(documented) == sorted(exported), "each press in docs/PRESSES.md's 'What a press reads' table"
    for name, cell in documented.items():
        press = default_press(getattr(presses, name))
        assert press.hidden_states_rows == documented_value(press, cell), (name, cell)


# --- what a press reads of a context: the declared rows give exactly what all of them give -------------


@lru_cache(maxsize=None)
def padded_context(attn_implementation: str):
    """Layer 1's PrefillContext of a batch of two rows, the first left-padded by PAD."""
    model = cached_model("llama", attn_implementation)
    ids = random_ids(batch=2, seq_len=SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[0, :PAD], attention_mask[0, :PAD] = 0, 0
    recorder = RecordingPress()
    with torch.no_grad(), recorder(model):
        model(ids, attention_mask=attention_mask)
    return recorder.contexts[1]


def fresh(context, rows: int | None):
    """The context with its own keys and values (ThinK, Merge and KeyRerotation edit them in place), holding
    the layer inputs of its last `rows` positions."""
    copy = dataclasses.replace(context, keys=context.keys.clone(), values=context.values.clone())
    return copy.keeping_newest_inputs(rows)


def same_keep(keep: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    return keep is expected is None or (keep is not None and expected is not None and torch.equal(keep, expected))


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_the_declared_rows_give_the_keep_mask_of_every_row(scorer, wrapper):
    """Compressing a context that holds only the rows the tree declares gives the same keep mask and the same
    edited keys/values as the whole context; a tree that needs every row refuses a context holding fewer."""
    context = padded_context(attention_for(scorer))
    press = matrix_press(scorer, wrapper)
    rows = press.layer_input_rows
    whole = fresh(context, None)
    expected = press.compress(whole)
    if rows is None:
        with pytest.raises(ValueError, match="layer inputs"):
            press.compress(fresh(context, 4))
        return
    truncated = fresh(context, rows)
    assert truncated.input_rows == rows < SEQ  # the test truncates
    assert same_keep(press.compress(truncated), expected)
    assert torch.equal(truncated.keys, whole.keys) and torch.equal(truncated.values, whole.values)


def test_a_truncated_context_serves_its_rows_and_refuses_more():
    context = padded_context("sdpa")
    truncated = context.keeping_newest_inputs(8)
    assert truncated.input_rows == 8 and context.input_rows == SEQ
    assert torch.equal(truncated.last_queries(8), context.last_queries(8))
    assert torch.equal(truncated.last_queries(3), context.last_queries(3))
    with pytest.raises(ValueError, match="last 8 positions, and 9 were asked for"):
        truncated.last_queries(9)
    with pytest.raises(ValueError, match="PrefillContext.slice needs the layer inputs"):
        truncated.slice(0, 16)
    with pytest.raises(ValueError, match="last 0 positions"):
        context.keeping_newest_inputs(0).newest_inputs(1)


def test_keeping_the_newest_inputs_copies_them():
    context = padded_context("sdpa")
    truncated = context.keeping_newest_inputs(8)
    cos, sin = truncated.position_embeddings
    for kept, full in [(truncated.hidden_states, context.hidden_states), (cos, context.position_embeddings[0]),
                       (sin, context.position_embeddings[1])]:  # fmt: skip
        assert kept.untyped_storage().nbytes() == kept.nbytes  # its own storage, not a view of the full one
        assert kept.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
        assert torch.equal(kept, full[:, -8:])
    assert context.keeping_newest_inputs(None) is context
    assert context.keeping_newest_inputs(SEQ + 10) is context
    nothing = context.keeping_newest_inputs(0)
    assert nothing.hidden_states is None and nothing.position_embeddings is None


@pytest.mark.parametrize(
    "make", [lambda n: SnapKVPress(0.5, window_size=n), lambda n: ExpectedAttentionPress(0.5, n_recent=n),
             lambda n: ThinKPress(KnormPress(0.5), window_size=n),
             lambda n: SimLayerKVPress(0.5, n_last=n, lazy_threshold=0.5)],  # measures the lazy criterion
)  # fmt: skip
def test_a_press_given_its_rows_compresses_as_with_all_and_fails_with_fewer(make):
    context, press = padded_context("sdpa"), make(8)
    assert same_keep(press.compress(fresh(context, press.layer_input_rows)), press.compress(fresh(context, None)))
    with pytest.raises(ValueError, match="last 7 positions, and 8 were asked for"):
        press.compress(fresh(context, 7))


# --- a whole prefill holds only the declared rows, and compresses as with all of them ----------------------

MODEL_SCOPE = {
    "snapkv": lambda: SnapKVPress(0.75, window_size=8),
    "expected_attention": lambda: ExpectedAttentionPress(0.75, n_recent=8, n_future_positions=16, use_value_norm=False),
}


def generate_recording_rows(model, press, ids, attention_mask):
    """(generate's output, the hidden-state rows of every context the session recorded for the whole prefill)."""
    rows = []
    original = session_module.PressSession._record_for_whole_prefill

    def spy(self, context, cache, first_context):
        rows.append(context.input_rows)
        assert context.position_embeddings[0].shape[1] == context.input_rows
        return original(self, context, cache, first_context)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad(), press(model):
        patch.setattr(session_module.PressSession, "_record_for_whole_prefill", spy)
        out = model.generate(ids, attention_mask=attention_mask, past_key_values=DynamicCache(config=model.config),
                             max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)  # fmt: skip
    return out, rows


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("scorer", sorted(MODEL_SCOPE))
def test_model_scope_keeps_and_generates_the_same_with_only_the_window_held(scorer, backend, monkeypatch):
    model = tiny_model("llama")
    ids = random_ids(batch=2, seq_len=SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[0, :PAD], attention_mask[0, :PAD] = 0, 0
    press = AdaptivePress(MODEL_SCOPE[scorer](), scope="model", backend=backend)
    held, held_rows = generate_recording_rows(model, press, ids, attention_mask)
    monkeypatch.setattr(type(press.press), "hidden_states_rows", None)  # the tree then reads every row
    every, every_rows = generate_recording_rows(model, press, ids, attention_mask)
    assert held_rows == [8] * 3 and every_rows == [SEQ] * 3
    assert torch.equal(held.sequences, every.sequences)
    held_counts, every_counts = kept_token_counts(held.past_key_values), kept_token_counts(every.past_key_values)
    assert sorted(held_counts) == sorted(every_counts) == [0, 1, 2]
    for index, counts in held_counts.items():
        assert torch.equal(counts, every_counts[index])
    if backend == "mask":  # the very (layer, head, token) sets
        held_layers, every_layers = compressed_layers(held.past_key_values), compressed_layers(every.past_key_values)
        for index, layer in held_layers.items():
            assert torch.equal(layer.context_keep, every_layers[index].context_keep)
