"""GPU tests of the Triton split-KV attention over the flat head-wise cache (adakv.kernels.triton_decode):
equal to the PyTorch reference (float64) on fresh random inputs with unequal head lengths, slack
rows poisoned with NaN, poisoned outputs, GQA 4 and 8, head_dim 64/128, decode and causal appends.
Skipped cleanly without CUDA or triton."""

from __future__ import annotations

import pytest
import torch

from adakv.kernels import triton_decode
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import available_gpu_path, flat_attention, reference_flat_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not triton_decode.triton_available(), reason="needs triton"),
]


class Config:
    _attn_implementation = "adakv_sdpa"


def random_layer(batch, kv_heads, head_dim, context, query_length, dtype, min_slack=16, empty_head=False):
    """A flat layer with very unequal head lengths, `query_length` appended tokens, and every row that no
    sequence uses (slack) set to NaN, so that reading one shows in the output."""
    keys = torch.randn(batch, kv_heads, context, head_dim, device="cuda").to(dtype)
    values = torch.randn_like(keys)
    keep_rate = torch.rand(batch, kv_heads, 1, device="cuda") ** 2  # some heads keep few rows, some many
    keep = torch.rand(batch, kv_heads, context, device="cuda") < keep_rate
    if empty_head:
        keep[0, 0] = False  # this head attends only the appended tokens
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=max(min_slack, query_length + 8))
    new = torch.randn(batch, kv_heads, query_length, head_dim, device="cuda").to(dtype)
    layer.update(new, torch.randn_like(new))
    rows = torch.arange(layer.total_rows, device="cuda")
    sequence_of_row = torch.searchsorted(layer.offsets, rows, right=True) - 1
    used = rows - layer.offsets[sequence_of_row] < layer.lengths[sequence_of_row]
    assert (~used).any(), "the test needs slack rows to poison"
    layer.keys[~used] = float("nan")
    layer.values[~used] = float("nan")
    return layer


def transformers_layout_query(batch, heads, query_length, head_dim, dtype):
    """(batch, heads, q, d) with the strides a transformers model hands over (a transposed view)."""
    return torch.randn(batch, query_length, heads, head_dim, device="cuda").to(dtype).transpose(1, 2)


def reference_float64(query, layer, scaling):
    clone = FlatHeadwiseLayer.__new__(FlatHeadwiseLayer)
    clone.__dict__.update(layer.__dict__)
    clone.keys, clone.values = layer.keys.double(), layer.values.double()
    return reference_flat_attention(query.double(), clone, scaling)


def poisoned_output(query):
    batch, heads, query_length, head_dim = query.shape
    return torch.full((batch, query_length, heads, head_dim), float("nan"), device="cuda", dtype=query.dtype)


def poison_allocator():
    """Leave NaNs in the caching allocator's free blocks, so internal torch.empty buffers start poisoned."""
    torch.full((64 * 2**20,), float("nan"), device="cuda")  # freed at once, kept in the cache


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("query_length", [1, 7, 33])
def test_fp32_equals_reference(batch, group, head_dim, query_length):
    kv_heads = 2
    layer = random_layer(batch, kv_heads, head_dim, 700, query_length, torch.float32, empty_head=batch == 3)
    query = transformers_layout_query(batch, kv_heads * group, query_length, head_dim, torch.float32)
    scaling = head_dim**-0.5
    out = poisoned_output(query)
    poison_allocator()
    triton_decode.split_kv_attention(
        query, layer.keys, layer.values, layer.offsets, layer.context_kept, kv_heads, layer.max_length, scaling,
        out=out, extra_length=layer.appended,
    )  # fmt: skip
    assert not out.isnan().any(), "an output element was not written (or a slack row was read)"
    error = relative_error(out, reference_float64(query, layer, scaling))
    assert error < 1e-5, f"relative error {error:.3g}"


@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_any_number_of_splits_gives_the_same_result(num_splits):
    """64 splits leave many splits of short heads empty; they must not disturb the merge."""
    layer = random_layer(2, 4, 128, 1500, 1, torch.float32)
    query = transformers_layout_query(2, 16, 1, 128, torch.float32)
    poison_allocator()
    out = triton_decode.triton_flat_attention(query, layer, 0.1, num_splits=num_splits)
    error = relative_error(out, reference_float64(query, layer, 0.1))
    assert error < 1e-5, f"relative error {error:.3g} with {num_splits} splits"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("query_length", [1, 33])
def test_half_precision_close_to_reference(dtype, query_length):
    layer = random_layer(3, 8, 128, 3000, query_length, dtype)
    query = transformers_layout_query(3, 32, query_length, 128, dtype)
    out = poisoned_output(query)
    triton_decode.split_kv_attention(
        query, layer.keys, layer.values, layer.offsets, layer.lengths, 8, layer.max_length, 128**-0.5, out=out
    )
    assert not out.isnan().any()
    error = relative_error(out, reference_float64(query, layer, 128**-0.5))
    assert error < 1e-2, f"relative error {error:.3g}"


def test_long_heads_at_batch_one_use_many_splits():
    """The decode shape the kernel is for: batch 1, 8 KV heads of thousands of rows, GQA 4."""
    layer = random_layer(1, 8, 128, 20000, 1, torch.bfloat16, min_slack=64)
    assert triton_decode.choose_num_splits(layer.max_length, 8, 132) > 8
    query = transformers_layout_query(1, 32, 1, 128, torch.bfloat16)
    out = triton_decode.triton_flat_attention(query, layer, 128**-0.5)
    error = relative_error(out, reference_float64(query, layer, 128**-0.5))
    assert error < 1e-2, f"relative error {error:.3g}"


def test_repeated_runs_are_bitwise_equal():
    layer = random_layer(2, 8, 128, 4000, 5, torch.bfloat16)
    query = transformers_layout_query(2, 32, 5, 128, torch.bfloat16)
    first = triton_decode.triton_flat_attention(query, layer, 0.09)
    poison_allocator()
    assert torch.equal(first, triton_decode.triton_flat_attention(query, layer, 0.09))


def test_flat_attention_prefers_triton_on_cuda_without_the_extension(monkeypatch):
    monkeypatch.setenv("ADAKV_KERNELS", "reference")  # the CUDA decode kernel is preferred when in use
    assert available_gpu_path() == "triton"
    layer = random_layer(1, 2, 64, 300, 1, torch.bfloat16)
    query = transformers_layout_query(1, 8, 1, 64, torch.bfloat16)
    fast = flat_attention(query, layer, 0.125)
    assert torch.equal(fast, triton_decode.triton_flat_attention(query, layer, 0.125))


def test_bad_input_is_refused():
    layer = random_layer(1, 2, 64, 100, 1, torch.float32)
    query = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_decode.triton_flat_attention(query.cpu(), layer, 0.1)
    with pytest.raises(TypeError, match="supports"):
        triton_decode.triton_flat_attention(query.double(), layer, 0.1)
    with pytest.raises(ValueError, match="grouped"):
        triton_decode.triton_flat_attention(query[:, :7], layer, 0.1)
    with pytest.raises(ValueError, match="out must be"):
        triton_decode.split_kv_attention(
            query, layer.keys, layer.values, layer.offsets, layer.lengths, 2, layer.max_length, 0.1,
            out=torch.empty(1, 1, 8, 32, device="cuda"),
        )  # fmt: skip


def test_decode_steps_reusing_the_layer_workspace_equal_fresh_allocations():
    """Single-token steps reuse the layer's split workspace (poisoned here with NaN before each step) while
    the split count changes with the length; every step equals a call with a freshly allocated workspace."""
    layer = random_layer(1, 8, 128, 2000, 1, torch.bfloat16, min_slack=600)
    splits_seen = set()
    for step in range(40):
        new = torch.randn(1, 8, 1, 128, device="cuda").to(torch.bfloat16)
        for _ in range(13):  # lengths cross several MIN_KEYS_PER_SPLIT boundaries over the loop
            layer.update(new, -new)
        query = transformers_layout_query(1, 32, 1, 128, torch.bfloat16)
        if layer.split_workspace.buffer is not None:
            layer.split_workspace.buffer.fill_(float("nan"))
        reused = triton_decode.triton_flat_attention(query, layer, 0.09)
        fresh = triton_decode.split_kv_attention(
            query, layer.keys, layer.values, layer.offsets, layer.context_kept, 8, layer.max_length, 0.09,
            extra_length=layer.appended,
        )  # fmt: skip
        assert torch.equal(reused, fresh), f"step {step}"
        splits_seen.add(triton_decode.choose_num_splits(layer.max_length, 8, 132))
    assert len(splits_seen) > 1
    error = relative_error(reused, reference_float64(query, layer, 0.09))
    assert error < 1e-2, f"relative error {error:.3g}"


@pytest.mark.parametrize("batch, splits", [(1, 16), (8, 4), (3, 128)])
def test_the_last_split_merges_like_the_separate_combine_kernel_call_after_call(batch, splits):
    """With a reusable workspace the program that finishes a sequence's last chunk merges the chunks (an
    atomic counter per sequence, reset by that program). 200 calls in a row, eagerly and as replays of one
    CUDA graph: every output equals the two-kernel merge bit for bit and the counters end at zero (a lost
    or early count, or a chunk read before it was written, would show)."""
    layer = random_layer(batch, 8, 128, 3000, 1, torch.bfloat16)
    query = transformers_layout_query(batch, 32, 1, 128, torch.bfloat16)
    expected = triton_decode.split_kv_attention(
        query, layer.keys, layer.values, layer.offsets, layer.lengths, 8, layer.max_length, 0.09, num_splits=splits
    )  # fmt: skip
    workspace = triton_decode.SplitWorkspace()

    def merged_in_last():
        return triton_decode.split_kv_attention(
            query, layer.keys, layer.values, layer.offsets, layer.lengths, 8, layer.max_length, 0.09,
            num_splits=splits, workspace=workspace,
        )  # fmt: skip

    for call in range(200):
        assert torch.equal(merged_in_last(), expected), f"call {call}"
    assert not workspace.counters.any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = merged_in_last()
    for replay in range(200):
        output.fill_(float("nan"))
        graph.replay()
        assert torch.equal(output, expected), f"replay {replay}"
    assert not workspace.counters.any()


def test_decode_refuses_a_query_of_another_dtype():
    layer = random_layer(1, 2, 64, 300, 1, torch.bfloat16)
    query = transformers_layout_query(1, 8, 1, 64, torch.float16)
    with pytest.raises(TypeError, match="one dtype"):
        triton_decode.triton_flat_attention(query, layer, 0.125)
