"""GPU tests of the evict backend: CUDA kernels equal the reference exactly, varlen attention and
end-to-end logits agree with the mask backend. Skipped cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from adakv.kernels import cuda_flat as kernels, flat_reference as kernels_reference
from adakv import presses as P
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import available_gpu_path, flat_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


class Config:
    _attn_implementation = "adakv_sdpa"


def poisoned(rows, head_dim, dtype):
    return torch.full((rows, head_dim), float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_copy_rows_kernel_equals_reference(dtype, head_dim):
    src_k = torch.randn(5000, head_dim, device="cuda").to(dtype)
    src_v = torch.randn(5000, head_dim, device="cuda").to(dtype)
    src_index = torch.randperm(5000, device="cuda")[:3000]
    dst_index = torch.randperm(4000, device="cuda")[:3000]
    expected_k, expected_v = poisoned(4000, head_dim, dtype), poisoned(4000, head_dim, dtype)
    actual_k, actual_v = expected_k.clone(), expected_v.clone()
    kernels_reference.copy_rows(src_k, src_v, expected_k, expected_v, src_index, dst_index)
    kernels.cuda_copy_rows(src_k, src_v, actual_k, actual_v, src_index, dst_index)
    torch.cuda.synchronize()
    assert torch.equal(actual_k.nan_to_num(7.0), expected_k.nan_to_num(7.0))
    assert torch.equal(actual_v.nan_to_num(7.0), expected_v.nan_to_num(7.0))
    assert not actual_k[dst_index].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_tokens, padded", [(1, False), (7, False), (7, True)])
def test_append_rows_kernel_equals_reference(dtype, new_tokens, padded):
    """Rows land behind each sequence's length, the lengths advance, and left padding is never written."""
    sequences, head_dim = 64, 128
    offsets = torch.arange(sequences, device="cuda") * 20
    lengths = torch.randint(0, 5, (sequences,), device="cuda")
    first = torch.randint(0, new_tokens, (sequences,), device="cuda") if padded else None
    new_k = torch.randn(sequences, new_tokens, head_dim, device="cuda").to(dtype)
    new_v = torch.randn(sequences, new_tokens, head_dim, device="cuda").to(dtype)
    expected_k, expected_v = poisoned(sequences * 20 + 20, head_dim, dtype), poisoned(sequences * 20 + 20, head_dim, dtype)
    actual_k, actual_v = expected_k.clone(), expected_v.clone()
    expected_lengths, actual_lengths = lengths.clone(), lengths.clone()
    kernels_reference.append_rows(expected_k, expected_v, new_k, new_v, offsets, expected_lengths, first)
    kernels.cuda_append_rows(actual_k, actual_v, new_k, new_v, offsets, actual_lengths, first)
    torch.cuda.synchronize()
    assert torch.equal(actual_lengths, expected_lengths)
    assert torch.equal(actual_k.nan_to_num(7.0), expected_k.nan_to_num(7.0))
    assert torch.equal(actual_v.nan_to_num(7.0), expected_v.nan_to_num(7.0))


def test_kernels_refuse_bad_input():
    rows = torch.zeros(8, 64, device="cuda", dtype=torch.float64)
    index = torch.zeros(1, device="cuda", dtype=torch.long)
    with pytest.raises(TypeError, match="support dtypes"):
        kernels.cuda_copy_rows(rows, rows, rows, rows, index, index)
    half = torch.zeros(8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.cuda_copy_rows(half.cpu(), half, half, half, index, index)
    with pytest.raises(ValueError, match="is on cpu"):
        kernels.cuda_copy_rows(half, half, half, half, index.cpu(), index)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        odd = torch.zeros(8, 4, device="cuda", dtype=torch.float16)
        kernels.cuda_copy_rows(odd, odd, odd, odd, index, index)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flat_layer_on_gpu_equals_cpu_layer(dtype):
    keys = torch.randn(2, 8, 300, 128).to(dtype)
    values = torch.randn(2, 8, 300, 128).to(dtype)
    keep = torch.rand(2, 8, 300) < 0.3
    cpu = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=4)
    gpu = FlatHeadwiseLayer(keys.cuda(), values.cuda(), keep.cuda(), Config(), min_slack=4)
    for step in range(12):  # crosses several re-layouts
        new = torch.randn(2, 8, 1 + step % 3, 128).to(dtype)
        cpu.update(new, -new)
        gpu.update(new.cuda(), -new.cuda())
    assert torch.equal(gpu.offsets.cpu(), cpu.offsets) and torch.equal(gpu.lengths.cpu(), cpu.lengths)
    used = torch.cat([torch.arange(int(o), int(o + n)) for o, n in zip(cpu.offsets, cpu.lengths)])
    assert torch.equal(gpu.keys.cpu()[used], cpu.keys[used])
    assert torch.equal(gpu.values.cpu()[used], cpu.values[used])


@pytest.mark.parametrize("new_tokens", [1, 9])
def test_gpu_varlen_attention_matches_reference(new_tokens):
    if available_gpu_path() == "reference":
        pytest.skip("no varlen attention with seqused_k in this torch / flash-attn")
    keys = torch.randn(2, 8, 2000, 128, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(2, 8, 2000, device="cuda") < torch.rand(2, 8, 1, device="cuda")  # uneven heads
    layer = FlatHeadwiseLayer(keys, torch.randn_like(keys), keep, Config(), min_slack=16)
    new = torch.randn(2, 8, new_tokens, 128, device="cuda", dtype=torch.bfloat16)
    layer.update(new, torch.randn_like(new))
    query = torch.randn(2, 32, new_tokens, 128, device="cuda", dtype=torch.bfloat16)
    fast = flat_attention(query, layer, 128**-0.5)
    reference = flat_attention(query.float(), _float_copy(layer), 128**-0.5, implementation="reference")
    error = (fast.float() - reference).norm() / reference.norm()
    assert error < 1e-2, f"relative error {error:.3g}"


def _float_copy(layer):
    clone = FlatHeadwiseLayer.__new__(FlatHeadwiseLayer)
    clone.__dict__.update(layer.__dict__)
    clone.keys, clone.values = layer.keys.float(), layer.values.float()
    return clone


def small_llama():
    config = LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("press_factory", [
    lambda backend: P.SnapKVPress(0.75, window_size=32, backend=backend),
    lambda backend: P.AdaptivePress(P.SnapKVPress(0.75, window_size=32), backend=backend),
    lambda backend: P.CURPress(0.75, backend=backend),
    lambda backend: P.FinchPress(0.75, window_size=32, chunk_length=128, backend=backend),
    lambda backend: P.DuoAttentionPress(0.5, window_size=32, backend=backend),
    lambda backend: P.HeadKVPress(P.SnapKVPress(0.75, window_size=32), window_size=32, backend=backend),
    lambda backend: P.ThinKPress(P.SnapKVPress(0.75, window_size=32), backend=backend),
    lambda backend: P.MergePress(P.SnapKVPress(0.75, window_size=32), backend=backend),
])  # fmt: skip
def test_end_to_end_evict_logits_close_to_mask(press_factory):
    model = small_llama()
    ids = torch.randint(3, 1000, (2, 600), device="cuda")
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :50] = 0
    question = torch.randint(3, 1000, (2, 12), device="cuda")
    decode_tokens = torch.randint(3, 1000, (5, 2, 1), device="cuda")  # the same inputs for both backends
    results = {}
    for backend in ("mask", "evict"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press_factory(backend)(model):
            mask = attention_mask
            model(ids, attention_mask=mask, past_key_values=cache)
            mask = torch.cat([mask, torch.ones_like(question)], 1)
            logits = [model(question, attention_mask=mask, past_key_values=cache).logits[:, -1].float()]
            for token in decode_tokens:
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                logits.append(model(token, attention_mask=mask, past_key_values=cache).logits[:, -1].float())
        results[backend] = torch.stack(logits)
    error = (results["evict"] - results["mask"]).norm() / results["mask"].norm()
    assert error < 2e-2, f"relative error {error:.3g}"
