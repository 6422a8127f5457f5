"""GPU tests of the fp8 flat cache (kv_dtype="float8_e4m3fn", scripts/gpu_fp8.sh): the Triton attention reading
fp8 rows against the float64 reference of the same rows (slack poisoned with NaN), the Triton append kernel's
codes bit for bit against torch's quantization, the automatic path choice, and a model decoding from fp8 eagerly,
from CUDA graphs and with every fusion. Skipped cleanly without CUDA or triton; below compute capability 8.9
only the refusal runs."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adakv import presses as P
from adakv.cache import FlatHeadwiseLayer
from adakv.cache.flat_attention import choose_implementation, flat_attention, reference_flat_attention
from adakv.kernels import fp8_append, fp8_reference as fp8, triton_decode

from conftest import random_ids, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not triton_decode.triton_available(), reason="needs triton"),
]
FP8 = torch.float8_e4m3fn


def reads_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


needs_sm89 = pytest.mark.skipif(not reads_fp8(), reason="fp8 KV needs compute capability 8.9 or newer")


class Config:
    _attn_implementation = "adakv_sdpa"


def fp8_layer(batch, kv_heads, head_dim, context, query_length, dtype=torch.bfloat16):
    """An fp8 layer with unequal head lengths, `query_length` appended tokens and every unused row's codes and
    scales set to NaN, so that reading one shows in the output."""
    keys = torch.randn(batch, kv_heads, context, head_dim, device="cuda").to(dtype)
    keep = torch.rand(batch, kv_heads, context, device="cuda") < torch.rand(batch, kv_heads, 1, device="cuda") ** 2
    layer = FlatHeadwiseLayer(keys, torch.randn_like(keys), keep, Config(), min_slack=query_length + 16, kv_dtype=FP8)
    new = torch.randn(batch, kv_heads, query_length, head_dim, device="cuda").to(dtype)
    layer.update(new, torch.randn_like(new))
    rows = torch.arange(layer.total_rows, device="cuda")
    sequence = torch.searchsorted(layer.offsets, rows, right=True) - 1
    unused = rows - layer.offsets[sequence] >= layer.lengths[sequence]
    for codes, scales in ((layer.keys, layer.key_scales), (layer.values, layer.value_scales)):
        fp8.as_bytes(codes)[unused] = 0x7F  # e4m3fn's NaN
        scales[unused] = float("nan")
    return layer


def dequantized_float64(layer):
    """A twin of `layer` holding its dequantized rows in float64 (NaN slack stays NaN)."""
    clone = FlatHeadwiseLayer.__new__(FlatHeadwiseLayer)
    clone.__dict__.update(layer.__dict__)
    clone.keys = fp8.dequantize(layer.keys, layer.key_scales, torch.float64)
    clone.values = fp8.dequantize(layer.values, layer.value_scales, torch.float64)
    clone.key_scales = clone.value_scales = None
    clone.kv_dtype = clone.dtype = torch.float64
    return clone


def test_gpus_below_8_9_are_refused_with_the_reason():
    keys = torch.randn(1, 2, 8, 64, device="cuda")
    keep = torch.ones(1, 2, 8, dtype=torch.bool, device="cuda")
    if reads_fp8():
        assert FlatHeadwiseLayer(keys, keys, keep, Config(), kv_dtype=FP8).quantized
    else:
        with pytest.raises(ValueError, match="compute capability 8.9 or newer"):
            FlatHeadwiseLayer(keys, keys, keep, Config(), kv_dtype=FP8)


@needs_sm89
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("query_length", [1, 7, 33])
def test_triton_reads_fp8_rows_like_the_float64_reference(batch, group, head_dim, query_length):
    layer = fp8_layer(batch, 2, head_dim, 700, query_length)
    query = torch.randn(batch, query_length, 2 * group, head_dim, device="cuda").to(torch.bfloat16).transpose(1, 2)
    expected = reference_flat_attention(query.double(), dequantized_float64(layer), head_dim**-0.5)
    assert choose_implementation(query, layer.num_heads, quantized=True) == "triton"
    actual = flat_attention(query, layer, head_dim**-0.5)
    assert not torch.isnan(actual).any()
    error = ((actual.double() - expected).norm() / expected.norm()).item()
    assert error < 1e-2, error  # bf16 queries and products over exactly dequantized rows


@needs_sm89
@pytest.mark.parametrize("padded", [False, True])
def test_the_append_kernel_writes_torchs_codes_bit_for_bit(padded):
    sequences, tokens, head_dim = 64, 5, 128
    spread = torch.logspace(-20, 20, sequences * tokens, device="cuda").view(sequences, tokens, 1)
    new_keys = torch.randn(sequences, tokens, head_dim, device="cuda") * spread
    new_values = torch.randn(sequences, tokens, head_dim, device="cuda").to(torch.bfloat16)
    offsets = torch.arange(sequences, device="cuda") * 12
    lengths = torch.randint(0, 6, (sequences,), device="cuda")
    first = torch.randint(0, tokens, (sequences,), device="cuda") if padded else None

    def empty():
        return tuple(fp8.ScaledRows(torch.zeros(12 * sequences, head_dim, dtype=FP8, device="cuda"),
                                    torch.zeros(12 * sequences, device="cuda")) for _ in range(2))  # fmt: skip

    expected, actual = empty(), empty()
    expected_lengths, actual_lengths = lengths.clone(), lengths.clone()
    fp8.append_rows(expected, new_keys, new_values.float(), offsets, expected_lengths, first)
    fp8_append.triton_append_rows(actual, new_keys, new_values.float(), offsets, actual_lengths, first)
    assert torch.equal(actual_lengths, expected_lengths)
    for want, got in zip(expected, actual):
        assert torch.equal(fp8.as_bytes(got.codes), fp8.as_bytes(want.codes)) and torch.equal(got.scales, want.scales)


@needs_sm89
def test_the_cuda_decode_kernel_is_never_chosen_for_fp8_and_refuses_when_asked():
    layer = fp8_layer(1, 8, 128, 256, 1)
    query = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert choose_implementation(query, 8, 0, quantized=True) == "triton"
    with pytest.raises(ValueError, match="stores fp8 rows"):
        flat_attention(query, layer, 0.1, implementation="cuda_decode")


def decode(model, ids, press, **switches):
    """(the question's logits over the compressed context, greedy tokens, the cache's kv dtypes)."""
    context, question = ids[:, :-8], ids[:, -8:]
    with torch.no_grad(), press(model, **switches):
        cache = DynamicCache(config=model.config)
        model(context, past_key_values=cache)
        logits = model(question, past_key_values=cache).logits.float()
        dtypes = {layer.keys.dtype for layer in cache.layers}
        tokens = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    return logits, tokens, dtypes


@needs_sm89
def test_a_bf16_model_decodes_from_fp8_eagerly_from_graphs_and_fused():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = random_ids(batch=2, seq_len=256).cuda()
    bf16 = decode(model, ids, P.AdaptivePress(P.SnapKVPress(0.5, window_size=8)))
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), kv_dtype="float8_e4m3fn")
    eager = decode(model, ids, press)
    assert eager[2] == {FP8} and bf16[2] == {torch.bfloat16}
    assert ((eager[0] - bf16[0]).norm() / bf16[0].norm()).item() < 0.05
    assert (eager[1] == bf16[1]).float().mean() >= 0.8
    graphed = decode(model, ids, press, cuda_graphs=True)
    assert (graphed[1] == eager[1]).float().mean() >= 0.95  # the same kernels, replayed
    fused = decode(model, ids, press, cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True)
    assert (fused[1] == eager[1]).float().mean() >= 0.8 and fused[2] == {FP8}


@needs_sm89
def test_fp8_holds_at_most_0_52_of_the_bf16_bytes_on_the_gpu():
    keys = torch.randn(4, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(4, 8, 4096, device="cuda") < 0.25
    bf16 = FlatHeadwiseLayer(keys, keys, keep, Config())
    quantized = FlatHeadwiseLayer(keys, keys, keep, Config(), kv_dtype=FP8)
    assert quantized.held_bytes() <= 0.52 * bf16.held_bytes()
