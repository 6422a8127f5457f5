"""Batched answers of the evaluation: stacked flat layers attend every row as it would alone, every setting's
batched answer is the one it gets alone (greedy, float32 on CPU), and one scoring per scorer and layer serves
every ratio (the score memo keeps the very keep masks)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from transformers import DynamicCache

from adakv.cache import FlatHeadwiseLayer, stacked_cache, stacking_refusal
from adakv.cache.flat_attention import flat_attention
from adakv.evaluation import engine, registry, tasks
from adakv.evaluation.runner import SweepConfig, run_sweep
from adakv.presses import ComposedPress, RandomPress, SnapKVPress, StreamingLLMPress
from adakv.runtimes.hf import graph_decode

from test_evaluation import model, tokenizer  # noqa: F401 (pytest fixtures: the tiny Llama over SmolLM2's vocabulary)
from test_flat_cache import Config, layer_rows, random_layer_inputs

# the sweep's presses: uniform, per-layer and model-wide Ada-KV, KVzip's three forms, per-layer budgets
PRESSES = ["snapkv", "adakv_snapkv", "adakv_model_snapkv", "pyramidkv", "adakv_pyramidkv", "expected_attention",
           "streaming_llm", "kvzip", "adakv_kvzip", "adakv_model_kvzip", "keydiff", "adakv_cur"]
RATIOS = [0.5, 0.875]


# -- stacked flat layers -------------------------------------------------------------------------------

CONFIG = Config()  # one model's config: layers of different models do not stack


def stack_parts(slacks):
    parts = []
    for index, (batch, slack) in enumerate(slacks):
        keys, values, keep = random_layer_inputs(batch, 2, 24, 8, seed=index, keep_prob=0.3 + 0.2 * index)
        parts.append(FlatHeadwiseLayer(keys, values, keep, CONFIG, min_slack=slack))
    return parts


@pytest.mark.parametrize("slacks", [[(1, 4), (2, 4), (1, 4)], [(1, 4), (2, 0), (1, 9)]])
def test_a_stacked_layer_attends_each_row_as_its_own_layer(slacks):
    parts = stack_parts(slacks)  # the second case has unequal slack: rows are copied into a new layout
    stack = FlatHeadwiseLayer.stacked(parts)
    assert stack.batch_size == sum(part.batch_size for part in parts)
    expected = {}
    for part in parts:
        expected.update({len(expected) + s: rows for s, rows in layer_rows(part).items()})
    for s, (keys, values) in layer_rows(stack).items():
        assert torch.equal(keys, expected[s][0]) and torch.equal(values, expected[s][1])
    generator = torch.Generator().manual_seed(5)
    for new_tokens in (3, 1, 1):  # a question, then decode steps: appended to every row, attended per row
        new_keys = torch.randn(stack.batch_size, 2, new_tokens, 8, generator=generator)
        new_values = torch.randn_like(new_keys)
        query = torch.randn(stack.batch_size, 4, new_tokens, 8, generator=generator)
        stack.update(new_keys, new_values)
        outputs, first = [], 0
        for part in parts:
            rows = slice(first, first + part.batch_size)
            part.update(new_keys[rows], new_values[rows])
            outputs.append(flat_attention(query[rows], part, 0.3, implementation="segments"))
            first += part.batch_size
        assert torch.equal(flat_attention(query, stack, 0.3, implementation="segments"), torch.cat(outputs))
        torch.testing.assert_close(flat_attention(query, stack, 0.3, implementation="reference"), torch.cat(outputs))
    assert all(part.appended == 5 for part in parts) and stack.appended == 5


def test_stacking_refuses_what_it_cannot_keep_apart():
    parts = stack_parts([(1, 4), (1, 4)])
    parts[1].update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    with pytest.raises(ValueError, match="nothing appended"):
        FlatHeadwiseLayer.stacked(parts)
    keys, values, keep = random_layer_inputs(1, 2, 30, 8)
    with pytest.raises(ValueError, match="context length"):
        FlatHeadwiseLayer.stacked([stack_parts([(1, 4)])[0], FlatHeadwiseLayer(keys, values, keep, CONFIG)])
    with pytest.raises(TypeError):
        FlatHeadwiseLayer.stacked([])
    dense = DynamicCache()
    dense.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    assert "DynamicLayer" in stacking_refusal(dense)
    with pytest.raises(ValueError, match="cannot be stacked"):
        stacked_cache([dense])


# -- batched answers equal unbatched ones ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt(tokenizer):
    sample = tasks.generate("niah_multikey", 0, tasks.Haystack(tokenizer), 256)
    return engine.encode_prompt(tokenizer, sample, "cpu")


def unbatched_answers(model, tokenizer, prompt, settings, max_new_tokens, cuda_graphs=False):
    context_ids, question_ids = prompt
    dense = engine.dense_prefill(model, context_ids)
    return [engine.fast_answer(model, tokenizer, dense, registry.build_press(name, ratio), question_ids,
                               max_new_tokens, cuda_graphs)[0] for name, ratio in settings]


@pytest.mark.parametrize("cuda_graphs", [False, "emulate"])
def test_batched_answers_equal_the_unbatched_ones(model, tokenizer, prompt, cuda_graphs, monkeypatch):
    settings = [(name, ratio) for name in PRESSES for ratio in RATIOS]
    context_ids, question_ids = prompt
    with torch.no_grad():
        alone = unbatched_answers(model, tokenizer, prompt, settings, 10, cuda_graphs)
        # a token some answers hold and others do not becomes a stop token: rows stop at different steps
        first_tokens = [tokenizer(answer, add_special_tokens=False).input_ids[:3] for answer in alone]
        counts = pd.Series([t for tokens in first_tokens for t in set(tokens)]).value_counts()
        stop = int(counts[(counts > 1) & (counts < len(settings))].index[0])
        monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, stop])
        alone = unbatched_answers(model, tokenizer, prompt, settings, 10, cuda_graphs)
        captures = []
        original = graph_decode.GraphDecoder._capture_and_replay
        monkeypatch.setattr(graph_decode.GraphDecoder, "_capture_and_replay",
                            lambda self, *a: captures.append(1) or original(self, *a))
        dense = engine.dense_prefill(model, context_ids)
        presses = [registry.build_press(name, ratio) for name, ratio in settings]
        assert all(engine.batch_refusal(press, model) is None for press in presses)
        batched, compress, decode = engine.batched_fast_answers(model, tokenizer, dense, presses, question_ids, 10,
                                                                cuda_graphs)
    assert batched == alone
    assert len(set(alone)) > 4 and len({len(answer) for answer in alone}) > 2  # different answers, stopped apart
    assert len(compress) == len(settings) and decode > 0
    assert len(captures) == (1 if cuda_graphs else 0)  # one capture for every setting of the sample
    # the dense prefill is left as it was: the uncompressed answer is unchanged
    assert engine.fast_answer(model, tokenizer, dense, None, question_ids, 10)[0] == \
        unbatched_answers(model, tokenizer, prompt, [("none", 0.0)], 10)[0]


def test_batches_are_split_and_none_is_refused(model, tokenizer, prompt, monkeypatch):
    monkeypatch.setattr(engine, "BATCH_LIMIT", 3)
    settings = [("snapkv", r) for r in (0.25, 0.5, 0.75, 0.875)] + [("adakv_model_kvzip", 0.5)]
    context_ids, question_ids = prompt
    with torch.no_grad():
        alone = unbatched_answers(model, tokenizer, prompt, settings, 6)
        dense = engine.dense_prefill(model, context_ids)
        batched, _, _ = engine.batched_fast_answers(model, tokenizer, dense,
                                                    [registry.build_press(n, r) for n, r in settings], question_ids, 6)
    assert batched == alone
    assert "dense" in engine.batch_refusal(None, model)
    assert "mask" in engine.batch_refusal(registry.build_press("snapkv", 0.5, backend="mask"), model)


# -- one scoring per scorer and layer serves every ratio -----------------------------------------------

def layers_of(cache):
    """Every flat layer's kept rows of every sequence (keys and values), in order."""
    assert all(isinstance(layer, FlatHeadwiseLayer) for layer in cache.layers)
    return [[tensor for rows in layer_rows(layer).values() for tensor in rows] for layer in cache.layers]


def test_scores_are_shared_across_ratios_and_keep_the_masks(model, prompt, monkeypatch):
    context_ids, _ = prompt
    calls = []
    original = SnapKVPress.score
    monkeypatch.setattr(SnapKVPress, "score", lambda self, context: calls.append(type(self)) or original(self, context))
    names = ["snapkv", "adakv_snapkv", "adakv_model_snapkv", "pyramidkv", "adakv_pyramidkv"]
    ratios = [0.5, 0.75, 0.875, 0.9375]
    composed = lambda r: ComposedPress([StreamingLLMPress(compression_ratio=0.3), SnapKVPress(compression_ratio=r)])
    with torch.no_grad():
        shared = engine.dense_prefill(model, context_ids)
        presses = [registry.build_press(n, r) for n in names for r in ratios] + [composed(0.5)]
        memoized = [layers_of(engine.compressed_cache(shared, press)) for press in presses]
        assert len(calls) == 3 * 2 + 3  # SnapKV's and PyramidKV's once per layer; the restricted context apart
        calls.clear()
        fresh = [layers_of(engine.compressed_cache(engine.dense_prefill(model, context_ids), press)) for press in
                 [registry.build_press(n, r) for n in names for r in ratios] + [composed(0.5)]]
        assert len(calls) == 3 * len(presses)
    for with_memo, without in zip(memoized, fresh):
        for a, b in zip(with_memo, without):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    # a press whose scores change from call to call is never memoized
    assert RandomPress(compression_ratio=0.5).scores_memoizable is False
    assert RandomPress(compression_ratio=0.5, seed=3).scores_memoizable is True


# -- the runner --------------------------------------------------------------------------------------

def test_the_runner_writes_the_same_rows_batched(model, tokenizer, tmp_path):
    settings = dict(tasks=["niah_single", "variable_tracking"], context_lengths=[256], samples=2, check_naive=2,
                    presses=["none", "snapkv", "adakv_model_snapkv", "adakv_model_kvzip", "streaming_llm"],
                    ratios=[0.5, 0.875], costs=False)
    plain = run_sweep(SweepConfig(**settings), str(tmp_path / "plain"), model=model, tokenizer=tokenizer, progress=False)
    out = str(tmp_path / "batched")
    batched = run_sweep(SweepConfig(**settings, batch_answers=True), out, model=model, tokenizer=tokenizer,
                        progress=False)
    key = ["task", "context_length", "sample", "press", "ratio"]
    merged = plain.merge(batched, on=key, suffixes=("", "_batched"))
    assert len(merged) == len(plain) == 2 * 2 * (1 + 4 * 2)
    assert (merged.answer == merged.answer_batched).all() and (merged.score == merged.score_batched).all()
    timing = json.load(open(os.path.join(out, "metrics.json")))["fast_path_timing"]
    assert timing["answer_mismatches"] == [] and timing["settings_checked_both_ways"] == 2
    assert timing["batched_answers"]["settings_per_sample"] == 8
    assert json.load(open(os.path.join(out, "config.json")))["batch_answers"] is True
    with pytest.raises(ValueError, match="batch_answers"):  # a folder holds one way of answering
        run_sweep(SweepConfig(**settings), out, model=model, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="fast path"):
        SweepConfig(**settings, batch_answers=True, fast_path=False).validate()


def test_copied_rows_are_not_computed_again_and_a_deadline_stops_between_samples(model, tokenizer, tmp_path):
    import time

    from adakv.evaluation.runner import copy_rows

    common = dict(context_lengths=[256], samples=2, ratios=[0.5], check_naive=0, costs=False, batch_answers=True)
    source = str(tmp_path / "filter")
    filtered = run_sweep(SweepConfig(tasks=["niah_single", "variable_tracking"], presses=["none"], **common), source,
                         model=model, tokenizer=tokenizer, progress=False)
    target = SweepConfig(tasks=["variable_tracking"], presses=["none", "snapkv"], **common)
    out = str(tmp_path / "sweep")
    assert copy_rows(source, out, replace_seed(target), "none") == 0  # another sweep: nothing copied
    assert copy_rows(source, out, target, "none") == 2 and copy_rows(source, out, target, "none") == 0
    provenance = json.load(open(os.path.join(out, "config.json")))["provenance"]
    assert provenance[0]["copied_rows"]["from"] == "filter"
    stopped = run_sweep(target, out, model=model, tokenizer=tokenizer, progress=False, deadline=time.monotonic() - 1)
    assert len(stopped) == 2 and not os.path.exists(os.path.join(out, "summary.md"))  # no sample, no report
    results = run_sweep(target, out, model=model, tokenizer=tokenizer, progress=False)
    assert len(results) == 2 * 2 and os.path.exists(os.path.join(out, "summary.md"))
    key = ["task", "sample", "press", "ratio"]
    none = results[results.press == "none"].merge(filtered, on=key, suffixes=("", "_filter"))
    assert len(none) == 2 and (none.seconds == none.seconds_filter).all()  # the filter's rows, not run again
    assert len(json.load(open(os.path.join(out, "config.json")))["provenance"]) == 3


def replace_seed(config):
    from dataclasses import replace

    return replace(config, seed=config.seed + 1)
