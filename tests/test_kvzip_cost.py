"""KVzip's cheaper reconstruction keeps today's scores and selections (issue 23, item 2).

The statement these tests hold the press to is the one adakv shipped before: the decoder replays the repeat
prompt and the context over the dense cache with the model's own attention, and after every full-attention
layer the chunk's queries are recomputed from the layer's input (`models.queries`) and scored by
`torch_max_attention`. The press now scores inside the replay's attention (`attend_and_score`), stops each
replayed forward after the last scored layer, and holds no layer's hidden states during the prefill.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache

from adakv import AdaptivePress, KVzipPress, kept_token_counts
from adakv.cache import compressed_layers
from adakv.evaluation import engine
from adakv.kernels import kvzip_reference
from adakv.kernels.kvzip_reference import (
    flash_attention_split,
    torch_attend_and_score,
    torch_max_attention,
)
from adakv.models import attention_modules, is_full_attention_layer, queries
from adakv.presses.scorers.kvzip import reconstruction_scores

PROMPT = (5, 9, 17, 33)


@torch.no_grad()
def statement_scores(model, ids: torch.Tensor, chunk_size: int) -> dict[int, torch.Tensor]:
    """Today's PyTorch statement of KVzip's scores (see the module docstring), run on its own."""
    dense = engine.dense_prefill(model, ids)
    cache, decoder, length = dense.cache, dense.decoder, ids.shape[1]
    embed = decoder.get_input_embeddings()
    stream = torch.cat([embed(torch.tensor([PROMPT])).expand(ids.shape[0], -1, -1), embed(ids)], dim=1)
    scores = {c.layer_idx: c.keys.new_zeros(c.keys.shape[:3], dtype=torch.float32) for c in dense.contexts}
    chunk_start = [0]

    def after_attention(module, args, kwargs, output):
        chunk_queries = queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])
        keys = cache.layers[module.layer_idx].keys
        torch_max_attention(scores[module.layer_idx], chunk_queries, keys, module.scaling, length, chunk_start[0], len(PROMPT))

    handles = [c.module.register_forward_hook(after_attention, with_kwargs=True) for c in dense.contexts]
    try:
        for start in range(0, stream.shape[1], chunk_size):
            chunk_start[0] = start
            decoder(inputs_embeds=stream[:, start : start + chunk_size], past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def press_scores(model, ids: torch.Tensor, chunk_size: int) -> dict[int, torch.Tensor]:
    dense = engine.dense_prefill(model, ids)
    prefill = engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids)
    scores = reconstruction_scores(prefill, PROMPT, chunk_size)
    assert dense.cache.get_seq_length() == ids.shape[1]  # the replay left nothing behind
    return scores


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("chunk_size", [3, 16, 1000])
def test_scores_equal_todays_statement(family, chunk_size):
    model, ids = tiny_model(family), random_ids(2, 45, seed=3)
    expected, actual = statement_scores(model, ids, chunk_size), press_scores(model, ids, chunk_size)
    assert actual.keys() == expected.keys()
    for index in expected:
        torch.testing.assert_close(actual[index], expected[index], rtol=1e-5, atol=1e-7)
        assert (actual[index] > 0).all()  # every key was scored


def model_wide_keep(model, ids, ratio: float, scores_of) -> dict[int, torch.Tensor]:
    """The (layer, head, token) sets AdaptivePress(KVzipPress(ratio), scope="model") keeps from these scores."""
    dense = engine.dense_prefill(model, ids)
    press = AdaptivePress(KVzipPress(ratio, repeat_prompt_ids=PROMPT, chunk_size=16), scope="model")
    prefill = engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids)
    prefill.memo[press.press.memo_key()] = scores_of(model, ids, 16)
    return dict(zip((c.layer_idx for c in dense.contexts), press.compress_prefill(prefill)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_model_wide_selection_equals_todays(family, ratio):
    model, ids = tiny_model(family), random_ids(1, 60, seed=7)
    expected = model_wide_keep(model, ids, ratio, statement_scores)
    actual = model_wide_keep(model, ids, ratio, press_scores)
    assert expected.keys() == actual.keys()
    for index in expected:
        assert torch.equal(actual[index], expected[index]), f"layer {index}"
    kept = sum(int(keep.sum()) for keep in actual.values())
    assert 0 < kept < sum(keep.numel() for keep in actual.values())


def test_generate_keeps_todays_pairs_and_tokens():
    """Through model.generate: the cache the press leaves has exactly the pairs today's scores select."""
    model, ids = tiny_model("llama"), random_ids(1, 70, seed=2)
    press = AdaptivePress(KVzipPress(0.6, repeat_prompt_ids=PROMPT, chunk_size=16, backend="mask"), scope="model")
    expected = model_wide_keep(model, ids, 0.6, statement_scores)
    with torch.no_grad(), press(model):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    layers = compressed_layers(out.past_key_values)
    assert layers.keys() == expected.keys()
    for index, layer in layers.items():
        assert torch.equal(layer.context_keep, expected[index]), f"layer {index}"
    assert all(int(c.sum()) > 0 for c in kept_token_counts(out.past_key_values).values())


def chunk_inputs(batch=2, heads=6, kv_heads=2, chunk=37, head_dim=16, context=50, chunk_start=9, dtype=torch.float32):
    generator = torch.Generator().manual_seed(chunk + chunk_start)
    total = context + chunk_start + chunk
    shaped = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    return shaped(batch, chunk, heads, head_dim).transpose(1, 2), shaped(batch, kv_heads, total, head_dim), shaped(
        batch, kv_heads, total, head_dim
    )


def reference_attention(query, key, value, scaling, seen_before):
    """Plain softmax attention of a chunk whose row i sees keys [0, seen_before + i]: (batch, chunk, heads, d)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1).double() for t in (key, value))
    logits = query.double() @ key.transpose(-1, -2) * scaling
    rows, total = logits.shape[-2:]
    future = torch.arange(total)[None, :] > seen_before + torch.arange(rows)[:, None]
    return (logits.masked_fill(future, float("-inf")).softmax(-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("chunk_start, first_counted", [(0, 4), (9, 0), (0, 40), (3, 12)])
def test_torch_attend_and_score_is_attention_plus_todays_update(chunk_start, first_counted):
    query, key, value = chunk_inputs(chunk_start=chunk_start)
    running = torch.rand(2, 2, 50) * 0.05
    expected = running.clone()
    torch_max_attention(expected, query, key, 0.3, 50, chunk_start, first_counted)
    output = torch_attend_and_score(running, query, key, value, 0.3, 50, chunk_start, first_counted)
    assert torch.equal(running, expected)  # the same probabilities, so the same scores bit for bit
    expected_output = reference_attention(query, key, value, 0.3, 50 + chunk_start)
    torch.testing.assert_close(output.double(), expected_output, rtol=1e-5, atol=1e-5)
    scored_only = torch.rand(2, 2, 50) * 0.05
    again = scored_only.clone()
    assert torch_attend_and_score(scored_only, query, key, value, 0.3, 50, chunk_start, first_counted, False) is None
    torch_max_attention(again, query, key, 0.3, 50, chunk_start, first_counted)
    assert torch.equal(scored_only, again)


def test_small_blocks_attend_and_score_alike(monkeypatch):
    query, key, value = chunk_inputs()
    whole = torch.zeros(2, 2, 50)
    expected = torch_attend_and_score(whole, query, key, value, 0.3, 50, 9, 3)
    monkeypatch.setattr(kvzip_reference, "SCORING_BLOCK_ROWS", 5)
    blocks = torch.zeros(2, 2, 50)
    torch.testing.assert_close(torch_attend_and_score(blocks, query, key, value, 0.3, 50, 9, 3), expected)
    torch.testing.assert_close(blocks, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_flash_attention_is_the_chunks_attention(dtype):
    """`flash_attention_split` (the CUDA path's attention) on torch's CPU flash kernel: the output and the
    row log-sum-exps of plain attention."""
    query, key, value = chunk_inputs(dtype=dtype)
    output, lse = flash_attention_split(query, key, value, 0.3, 59)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.double(), reference_attention(query, key, value, 0.3, 59), **tolerance)
    groups = 3
    logits = query.double() @ key.repeat_interleave(groups, dim=1).double().transpose(-1, -2) * 0.3
    future = torch.arange(key.shape[2])[None, :] > 59 + torch.arange(query.shape[2])[:, None]
    expected_lse = logits.masked_fill(future, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected_lse, **tolerance)


def test_the_replay_stops_after_the_last_scored_layer(monkeypatch):
    """Nothing after the last scored layer's attention runs in a replayed forward (its MLP, the final norm)."""
    model, ids = tiny_model("llama"), random_ids(1, 30)
    last = max(m.layer_idx for m in attention_modules(model) if is_full_attention_layer(m))
    calls = []
    mlp = model.model.layers[last].mlp
    handle = mlp.register_forward_hook(lambda *args: calls.append(1))
    norm = model.model.norm.register_forward_hook(lambda *args: calls.append(2))
    try:
        dense = engine.dense_prefill(model, ids)
        calls.clear()
        prefill = engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids)
        reconstruction_scores(prefill, PROMPT, 8)
    finally:
        handle.remove(), norm.remove()
    assert calls == []
    assert model.config._attn_implementation == "sdpa"  # the replay's attention is switched back
    assert not any(hasattr(m, "adakv_replay_attention") for m in attention_modules(model))


def test_a_kvzip_block_holds_no_hidden_states(monkeypatch):
    """Model-wide KVzip records each layer's keys and values, not its input hidden states; a tree with a
    press that reads them (SnapKV) still records them."""
    from adakv.runtimes.hf import session as session_module

    recorded = []
    original = session_module.PressSession._record_for_whole_prefill

    def spy(self, context, cache, first_context):
        recorded.append(context)
        return original(self, context, cache, first_context)

    monkeypatch.setattr(session_module.PressSession, "_record_for_whole_prefill", spy)
    model, ids = tiny_model("llama"), random_ids(1, 30)
    from adakv import SnapKVPress

    for press, holds in [
        (AdaptivePress(KVzipPress(0.5, repeat_prompt_ids=PROMPT), scope="model"), False),
        (KVzipPress(0.5, repeat_prompt_ids=PROMPT), False),
        (AdaptivePress(SnapKVPress(0.5, window_size=4), scope="model"), True),
    ]:
        recorded.clear()
        with torch.no_grad(), press(model):
            model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        assert recorded and all((c.hidden_states is not None) == holds for c in recorded), press
        assert all((c.position_embeddings is not None) == holds for c in recorded)


def test_refuses_softcapped_attention():
    model, ids = tiny_model("llama"), random_ids(1, 20)
    dense = engine.dense_prefill(model, ids)
    model.config.attn_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="softcapping"):
            reconstruction_scores(engine.whole_prefill(dense.contexts, dense.cache, dense.decoder, input_ids=ids), PROMPT, 8)
    finally:
        del model.config.attn_logit_softcapping


@pytest.mark.parametrize("family, layer_by_layer", [("llama", True), ("mistral", True), ("qwen2", True), ("qwen3", True),
                                                     ("phi3", True), ("gemma3", False)])  # fmt: skip
def test_only_one_layer_holds_replayed_keys_at_a_time(family, layer_by_layer):
    """Layer by layer (every decoder layer full attention): whenever a layer is scored, no other layer holds
    replayed keys. Gemma3 (sliding-window layers) replays chunk by chunk, so every scored layer holds them."""
    from adakv.runtimes.hf.replay import layer_by_layer_decoder

    model, ids = tiny_model(family), random_ids(1, 30)
    dense = engine.dense_prefill(model, ids)
    assert layer_by_layer_decoder(dense.decoder, dense.contexts) == layer_by_layer
    cache, length, longest = dense.cache, ids.shape[1], []
    scored = {c.layer_idx for c in dense.contexts}
    real_attend = kvzip_reference.attend_and_score

    def spying_attend(*args, **kwargs):
        longer = [i for i in scored if cache.layers[i].keys.shape[-2] > length]
        longest.append(len(longer))
        return real_attend(*args, **kwargs)

    prefill = engine.whole_prefill(dense.contexts, cache, dense.decoder, input_ids=ids)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("adakv.presses.scorers.kvzip.attend_and_score", spying_attend)
        reconstruction_scores(prefill, PROMPT, 8)
    if layer_by_layer:
        assert len(scored) > 1 and max(longest) == 1
    else:  # by the last chunk every scored layer holds the replayed keys
        assert longest[-1] == len(scored)
    assert all(cache.layers[i].keys.shape[-2] == length for i in scored)  # and the replay left nothing behind


def test_kvzip_cost_benchmark_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_kvzip_cost", root / "benchmarks" / "bench_kvzip_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--layers", "2", "--cases", "1x300", "--repeats", "1", "--warmup-context", "40",
                "--chunk-size", "64", "--methods", "dense", "kvzip", "kvzip-chunk-order", "--out", str(tmp_path)])  # fmt: skip
    (json_file,) = tmp_path.glob("kvzip_cost_*.json")
    report = json.loads(json_file.read_text())
    assert (tmp_path / (json_file.stem + ".md")).exists()
    assert "adakv_commit" in report["meta"] and report["meta"]["torch"] == torch.__version__
    dense, kvzip, chunk_order = report["rows"]
    assert [r["method"] for r in report["rows"]] == ["dense", "kvzip", "kvzip-chunk-order"]
    assert kvzip["kv_gib"] == chunk_order["kv_gib"] < 0.5 * dense["kv_gib"]  # the same pairs kept either way
    assert kvzip["ttft_vs_dense"] > 0 and kvzip["peak_gib"] > 0  # a ratio, not a timing claim: CPU timings are noise
    assert 1 < kvzip["model_flops_vs_dense"] < kvzip["model_flops_before_vs_dense"]
