"""Layers split over two devices by an explicit device_map: every press family, both backends, gives the
single-device result, and evict == mask. The GPU test needs 2 CUDA devices; the same check runs on CPU
with both halves of the map on "cpu" (the device_map loading path, accelerate's hooks)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import COMMON, random_ids, tiny_model
from test_evict import run
from test_presses import SCORERS, attention_for
from transformers import AutoModelForCausalLM

from adakv import AdaptivePress, CriticalKVPress, KVzipPress, kept_token_counts, prefill_in_chunks
from adakv.cache import compressed_layers
from adakv.cache.flat import FlatHeadwiseLayer

RATIO = 0.5
NUM_LAYERS = COMMON["num_hidden_layers"]
WRAPPERS = {
    "none": lambda press: press,
    "adaptive": AdaptivePress,
    "adaptive_critical": lambda press: AdaptivePress(CriticalKVPress(press)),  # reads o_proj on the layer's device
}

GPU_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two_gpus = pytest.mark.skipif(GPU_COUNT < 2, reason=f"needs 2 CUDA devices, found {GPU_COUNT}")


def split_device_map(first, second) -> dict[str, object]:
    """Embeddings and the first layer on `first`, the other layers, the norm and the head on `second`."""
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first}
    device_map.update({f"model.layers.{i}": second for i in range(1, NUM_LAYERS)})
    device_map.update({"model.norm": second, "lm_head": second})
    return device_map


def load(path, attn_implementation: str, **placement):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32, **placement)
    return model.eval()


def layer_devices(model) -> set[torch.device]:
    return {layer.self_attn.o_proj.weight.device for layer in model.model.layers}


def chunked_run(model, press, ids, chunk_size=16, decode_steps=3):
    """Chunked prefill, then greedy decode steps: (last logits of every step, cache)."""
    logits = []
    with torch.no_grad(), press(model):
        cache = prefill_in_chunks(model, press, ids, chunk_size)
        next_ids = ids[:, -1:]
        for step in range(decode_steps):
            out = model(next_ids, past_key_values=cache, position_ids=torch.full_like(next_ids, ids.shape[1] + step))
            logits.append(out.logits[:, -1])
            next_ids = out.logits[:, -1:].argmax(-1)
    return logits, cache


def assert_same(reference, actual, what: str, tolerance: float):
    (expected_logits, expected_cache), (logits, cache) = reference, actual
    for step, (expected, got) in enumerate(zip(expected_logits, logits)):
        torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}, step {step}: {m}")
    expected_counts, counts = kept_token_counts(expected_cache), kept_token_counts(cache)
    assert expected_counts.keys() == counts.keys() and counts, f"{what}: compressed layers differ"
    for index in counts:
        assert torch.equal(counts[index].cpu(), expected_counts[index].cpu()), f"{what}: kept counts of layer {index}"


def check_split_equals_single(tmp_path, single_device, split_map, tolerance: float, scorers=tuple(SCORERS)):
    """Every scorer x {plain, AdaptivePress} x {mask, evict}, ordinary and chunked prefill."""
    ids = random_ids(1, 48)
    for scorer in sorted(scorers):
        attention = attention_for(scorer)
        path = tmp_path / attention
        if not path.exists():
            tiny_model("llama", attention).save_pretrained(path)
        single = load(path, attention, device_map={"": single_device})
        split = load(path, attention, device_map=split_map)
        assert len(layer_devices(split)) == len(set(split_map.values())), "the model was not split as asked"
        for wrapper_name, wrapper in WRAPPERS.items():
            runs = {}
            for backend in ("mask", "evict"):
                make = lambda: _press(scorer, wrapper, backend)  # noqa: E731 - a fresh press per run
                runs[backend] = run(split, make(), ids.to(split.device))
                what = f"{scorer}/{wrapper_name}/{backend}"
                assert_same(run(single, make(), ids.to(single.device)), runs[backend], f"{what}: split vs single", tolerance)
                if scorer != "observed_attention":  # refused by chunked prefill (its weights span chunks)
                    chunked = chunked_run(split, make(), ids.to(split.device))
                    assert_same(chunked_run(single, make(), ids.to(single.device)), chunked, f"{what} chunked", tolerance)
                if backend == "evict":
                    layers = compressed_layers(runs[backend][1])
                    assert all(isinstance(layer, FlatHeadwiseLayer) for layer in layers.values())
                    assert {layer.keys.device for layer in layers.values()} == layer_devices(split)
            assert_same(runs["mask"], runs["evict"], f"{scorer}/{wrapper_name}: evict vs mask", tolerance)


def _press(scorer: str, wrapper, backend: str):
    press = wrapper(SCORERS[scorer](RATIO))
    press.backend = backend
    return press


def test_explicit_device_map_on_cpu(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' device_map loading needs accelerate (pip install adakv[multi])")
    # two scorers (sdpa and eager) keep the CPU suite short; the GPU test runs every scorer
    check_split_equals_single(tmp_path, "cpu", split_device_map("cpu", "cpu"), 1e-5, ("snapkv", "observed_attention"))


@pytest.mark.gpu
@needs_two_gpus
def test_layers_split_over_two_gpus(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' device_map loading needs accelerate (pip install adakv[multi])")
    check_split_equals_single(tmp_path, "cuda:0", split_device_map(0, 1), tolerance=2e-4)


def test_evict_attention_switches_to_the_layers_gpu(monkeypatch):
    """Triton launches on the current device: on_device_of makes the query's GPU current when it is not."""
    from types import SimpleNamespace

    from adakv.runtimes.hf import attention

    switched = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: switched.append(device) or nullcontext())
    on_second = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    on_first = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    with attention.on_device_of(on_second), attention.on_device_of(on_first), attention.on_device_of(torch.zeros(1)):
        pass
    assert switched == [torch.device("cuda", 1)]


@pytest.mark.gpu
@needs_two_gpus
def test_kvzip_joined_projections_and_the_gemv_on_layers_split_over_two_gpus(tmp_path):
    """Model-wide KVzip (its Triton scoring), joined projections and the GEMV launch on each layer's GPU
    (fuse_elementwise refuses this model: accelerate wraps the final norm, a device_map entry of its own)."""
    pytest.importorskip("accelerate", reason="transformers' device_map loading needs accelerate (pip install adakv[multi])")
    tiny_model("llama").save_pretrained(tmp_path)
    single = load(tmp_path, "sdpa", device_map={"": "cuda:0"})
    split = load(tmp_path, "sdpa", device_map=split_device_map(0, 1))
    ids = random_ids(1, 48)
    fusions = dict(join_projections=True, gemv_linears=True)
    tokens = []
    for model in (single, split):
        press = AdaptivePress(KVzipPress(RATIO, repeat_prompt_ids=(5, 6, 7), chunk_size=16), scope="model")
        with torch.no_grad(), press(model, **fusions):
            tokens.append(model.generate(ids.to(model.device), max_new_tokens=8, do_sample=False, pad_token_id=0).cpu())
    assert torch.equal(tokens[0], tokens[1])
